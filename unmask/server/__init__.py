"""Unmask's HTTP front end: OpenAI-compatible routes over the async engine (docs/ARCHITECTURE.md §10)."""
