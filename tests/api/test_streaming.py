"""SSE on the wire, and streams under concurrency."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai

from tests.servers import API_KEY, sse_events


def test_raw_sse_framing(http):
    body = {"model": "base", "prompt": "Hello", "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["cache-control"] == "no-cache"
        raw = b"".join(resp.iter_raw())
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8


def test_native_generate_stream_framing(http):
    body = {"prompt": "Hello", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    plain = http.post("/v1/generate", json=body).json()
    with http.stream("POST", "/v1/generate", json={**body, "stream": True}) as resp:
        events = sse_events(b"".join(resp.iter_raw()))
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]"
    assert "".join(c["text"] for c in chunks) == plain["text"]
    assert chunks[-1]["usage"] == plain["usage"]


def test_stop_string_never_leaks_into_the_stream(http):
    base = {"model": "base", "prompt": "Once", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    full = http.post("/v1/completions", json=base).json()["choices"][0]["text"]
    stop = full[10:13]  # a string the greedy continuation is known to contain
    cut = full[: full.index(stop)]
    with http.stream("POST", "/v1/completions", json={**base, "stop": [stop], "stream": True}) as resp:
        chunks = [json.loads(e) for e in sse_events(b"".join(resp.iter_raw()))[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == cut
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_64_concurrent_greedy_streams_equal_alone(server, client):
    prompts = [f"Story number {i} begins" for i in range(8)]
    kwargs = dict(model="base", max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    alone = {p: client.completions.create(prompt=p, **kwargs).choices[0].text for p in prompts}

    async def one(aclient: openai.AsyncOpenAI, prompt: str) -> tuple[str, str]:
        stream = await aclient.completions.create(prompt=prompt, stream=True, **kwargs)
        return prompt, "".join([c.choices[0].text async for c in stream if c.choices])

    async def main() -> list[tuple[str, str]]:
        limits = httpx.Limits(max_connections=64)
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120,
                                      http_client=httpx.AsyncClient(limits=limits, timeout=120)) as aclient:
            return await asyncio.gather(*(one(aclient, prompts[i % 8]) for i in range(64)))

    results = asyncio.run(main())
    assert len(results) == 64
    for prompt, text in results:
        assert text == alone[prompt]
