"""Clients of the shared server (tests/conftest.py's `server`): the official openai client and httpx."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.servers import API_KEY


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c
