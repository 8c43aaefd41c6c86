"""HTTP routes: OpenAI generation endpoints and the operational ones."""
