"""Pydantic bodies of the HTTP API, each with an example for /docs."""
