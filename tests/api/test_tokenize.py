"""/tokenize and /detokenize on the shared server, against transformers' tokenizer of the same model."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer


@pytest.fixture(scope="module")
def hf_tokenizer(model_dirs):
    return AutoTokenizer.from_pretrained(model_dirs["base"])


def test_tokenize_counts_what_the_model_sees_and_detokenize_inverts_it(http, hf_tokenizer):
    text = "Zwei Männer spielen Fußball. 😀"
    body = http.post("/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    assert body["tokens"] == hf_tokenizer.encode(text) and body["count"] == len(body["tokens"])
    assert body["token_strs"] == hf_tokenizer.convert_ids_to_tokens(body["tokens"])
    assert body["max_model_len"] == 1024
    assert http.post("/detokenize", json={"tokens": body["tokens"]}).json() == {"prompt": text}
    # any served name works (they share the tokenizer); the count is what completions bills as prompt_tokens
    per_adapter = http.post("/tokenize", json={"model": "tr", "prompt": text}).json()
    usage = http.post("/v1/completions", json={"model": "base", "prompt": text, "max_tokens": 1}).json()["usage"]
    assert per_adapter["tokens"] == body["tokens"] and usage["prompt_tokens"] == body["count"]


def test_tokenize_messages_as_chat_renders_them(http, hf_tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    with_prompt = http.post("/tokenize", json={"messages": messages}).json()
    assert with_prompt["tokens"] == hf_tokenizer.encode("system: be brief\nuser: hi\nassistant:")
    usage = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1}).json()["usage"]
    assert usage["prompt_tokens"] == with_prompt["count"]
    without = http.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert without["tokens"] == hf_tokenizer.encode("system: be brief\nuser: hi\n")


@pytest.mark.parametrize("path, body, status, param", [
    ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "model"),
    ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, 422, None),
    ("/tokenize", {}, 422, None),
    ("/detokenize", {"tokens": [1, 1000]}, 400, "tokens"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/detokenize", {"model": "nope", "tokens": [1]}, 404, "model"),
])
def test_bad_requests_are_refused_with_the_error_shape(http, path, body, status, param):
    resp = http.post(path, json=body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["message"] and (param is None or error["param"] == param)
