"""Unmask's HTTP front end: OpenAI-compatible routes over the async engine (see DESIGN.md §3)."""
