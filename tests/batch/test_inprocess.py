"""lmservice/batch/inprocess.py: a POST handed to an ASGI app as a server would hand it, and its answer."""

from __future__ import annotations

import asyncio
import json

from lmservice.batch.inprocess import post


async def _echo(scope, receive, send):
    """Answers with what it was sent; checks for a disconnect first, as a route waiting on a client does."""
    request = await receive()
    watcher = asyncio.ensure_future(receive())
    await asyncio.sleep(0.01)
    assert not watcher.done(), "the connection must stay open until the answer is complete"
    body = json.dumps({"method": scope["method"], "path": scope["path"], "body": request["body"].decode(),
                       "more_body": request["more_body"],
                       "headers": {k.decode(): v.decode() for k, v in scope["headers"]}}).encode()
    await send({"type": "http.response.start", "status": 201, "headers": [(b"X-Request-ID", b"r-1")]})
    await send({"type": "http.response.body", "body": body[:5], "more_body": True})
    await send({"type": "http.response.body", "body": body[5:]})
    assert (await watcher)["type"] == "http.disconnect"


def test_a_post_reaches_the_app_whole_and_its_answer_comes_back():
    answer = asyncio.run(post(_echo, "/v1/classify", b'{"text": "hi"}', {"Authorization": "Bearer k"}))
    assert answer.status == 201 and answer.headers == {"x-request-id": "r-1"}
    sent = answer.json()
    assert sent["method"] == "POST" and sent["path"] == "/v1/classify"
    assert sent["body"] == '{"text": "hi"}' and sent["more_body"] is False
    assert sent["headers"] == {"content-type": "application/json", "authorization": "Bearer k",
                               "content-length": "14"}


def test_an_app_that_fails_before_answering_is_a_500_in_the_one_error_shape():
    async def broken(scope, receive, send):
        raise RuntimeError("boom")

    answer = asyncio.run(post(broken, "/v1/completions", b"{}", {}))
    assert answer.status == 500
    assert answer.json()["error"]["type"] == "internal_error"


def test_an_error_raised_after_the_answer_keeps_the_answer():
    async def answers_then_raises(scope, receive, send):  # Starlette's ServerErrorMiddleware does this
        await send({"type": "http.response.start", "status": 500, "headers": []})
        await send({"type": "http.response.body", "body": b'{"error": {"message": "internal server error"}}'})
        raise RuntimeError("boom")

    answer = asyncio.run(post(answers_then_raises, "/v1/completions", b"{}", {}))
    assert answer.status == 500 and answer.json() == {"error": {"message": "internal server error"}}
