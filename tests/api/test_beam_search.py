"""Beam search over HTTP: num_beams / length_penalty / early_stopping on the native endpoints, vLLM's
use_beam_search (+ best_of, n) on the OpenAI ones, the result streamed at the end, and every combination
that does not work a 400 naming its field."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel

from lmservice.api.schemas.tasks import TRANSLATE_NUM_BEAMS
from tests.servers import TRANSLATE_CARD, sse_events

EOS_ID = 999  # the test tokenizer's (tests/helpers.py)
PROMPT = [464, 3, 77, 12, 600, 5]


def hf_beams(model_dir, prompt: list[int], k: int, n: int, max_new: int, **kwargs) -> list[list[int]]:
    hf = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                          num_beams=k, num_return_sequences=n, eos_token_id=EOS_ID, pad_token_id=EOS_ID, **kwargs)
    return [row[:row.index(EOS_ID) + 1] if EOS_ID in row else row for row in out[:, len(prompt):].tolist()]


def test_completions_use_beam_search_matches_transformers(http, model_dirs):
    body = {"model": "base", "prompt": PROMPT, "max_tokens": 6, "use_beam_search": True, "best_of": 3, "n": 2,
            "length_penalty": 0.5, "early_stopping": True}
    resp = http.post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    choices = resp.json()["choices"]
    want = hf_beams(model_dirs["base"], PROMPT, 3, 2, 6, length_penalty=0.5, early_stopping=True)
    tok = AutoTokenizer.from_pretrained(model_dirs["base"])
    assert [c["index"] for c in choices] == [0, 1]
    assert [c["text"] for c in choices] == [tok.decode(row, skip_special_tokens=True) for row in want]
    assert resp.json()["usage"]["completion_tokens"] == sum(len(row) for row in want)


def test_generate_num_beams_is_the_best_beam(http, model_dirs):
    resp = http.post("/v1/generate", json={"prompt": "Hello there", "max_tokens": 6, "num_beams": 4})
    assert resp.status_code == 200, resp.text
    comp = http.post("/v1/completions", json={"model": "base", "prompt": "Hello there", "max_tokens": 6,
                                              "use_beam_search": True, "n": 1, "best_of": 4}).json()
    assert resp.json()["text"] == comp["choices"][0]["text"]
    greedy = http.post("/v1/generate", json={"prompt": "Hello there", "max_tokens": 6, "temperature": 0}).json()
    assert resp.json()["finish_reason"] in ("stop", "length") and greedy["text"]


def test_chat_use_beam_search_returns_n_beams(http):
    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 5, "use_beam_search": True,
            "n": 3}
    resp = http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    choices = resp.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert len({c["message"]["content"] for c in choices}) == 3  # three different hypotheses


def test_streamed_beam_search_arrives_whole_at_the_end(http):
    body = {"model": "base", "prompt": "Once", "max_tokens": 6, "use_beam_search": True, "n": 2, "best_of": 3}
    whole = http.post("/v1/completions", json=body).json()
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        chunks = [json.loads(e) for e in sse_events(b"".join(r.iter_raw()))[:-1]]
    by_index = {c["choices"][0]["index"]: c["choices"][0] for c in chunks}
    assert len(chunks) == 2  # one per beam, each whole and finished
    for choice in whole["choices"]:
        assert by_index[choice["index"]]["text"] == choice["text"]
        assert by_index[choice["index"]]["finish_reason"] == choice["finish_reason"]


def test_translate_searches_with_beams_by_default(http):
    text = "A dog runs."
    prompt = TRANSLATE_CARD["prompt_template"].replace("{text}", text)
    resp = http.post("/v1/translate", json={"text": text, "max_tokens": 8})
    assert resp.status_code == 200, resp.text

    def completion(**extra) -> str:
        out = http.post("/v1/completions", json={"model": "tr", "prompt": prompt, "max_tokens": 8, **extra})
        return out.json()["choices"][0]["text"].strip()

    beams = completion(use_beam_search=True, best_of=TRANSLATE_NUM_BEAMS)
    assert resp.json()["translations"][0]["text"] == beams
    one = http.post("/v1/translate", json={"text": text, "max_tokens": 8, "num_beams": 1}).json()
    assert one["translations"][0]["text"] == completion(temperature=0)
    # a temperature without num_beams samples (one beam); both together are refused
    sampled = http.post("/v1/translate", json={"text": text, "max_tokens": 8, "temperature": 0.8})
    assert sampled.status_code == 200, sampled.text
    both = http.post("/v1/translate", json={"text": text, "num_beams": 2, "temperature": 0.8})
    assert both.status_code == 400 and both.json()["error"]["param"] == "temperature"


BAD = [
    ("/v1/generate", {"num_beams": 2, "temperature": 0.7}, "temperature"),
    ("/v1/generate", {"num_beams": 2, "top_p": 0.9}, "top_p"),
    ("/v1/generate", {"num_beams": 2, "logprobs": 1}, "logprobs"),
    ("/v1/generate", {"num_beams": 2, "stop": ["."]}, "stop"),
    ("/v1/generate", {"num_beams": 2, "repetition_penalty": 1.2}, "repetition_penalty"),
    ("/v1/generate", {"num_beams": 2, "min_tokens": 2}, "min_tokens"),
    ("/v1/generate", {"num_beams": 0}, "num_beams"),
    ("/v1/generate", {"num_beams": 2, "early_stopping": "sometimes"}, "early_stopping"),
    ("/v1/generate", {"num_beams": 2, "length_penalty": 11}, "length_penalty"),
    ("/v1/generate", {"length_penalty": 0.5}, "length_penalty"),
    ("/v1/generate", {"early_stopping": True}, "early_stopping"),
    ("/v1/generate", {"num_beams": 2, "structured_outputs": {"choice": ["a", "b"]}}, "structured_outputs"),
    ("/v1/completions", {"use_beam_search": True, "n": 3, "best_of": 2}, "n"),
    ("/v1/completions", {"best_of": 2}, "best_of"),
    ("/v1/completions", {"use_beam_search": True, "n": 2, "logprobs": 1}, "logprobs"),
    ("/v1/completions", {"use_beam_search": True, "n": 2, "temperature": 1.0}, "temperature"),
    ("/v1/translate", {"num_beams": 3, "length_penalty": "long"}, None),  # wrong JSON type: 422
]


@pytest.mark.parametrize(("path", "extra", "param"), BAD, ids=[f"{p}-{'-'.join(e)}" for p, e, _ in BAD])
def test_what_does_not_combine_is_a_400_naming_the_field(http, path, extra, param):
    body = {"text": "x"} if path == "/v1/translate" else {"prompt": "x"}
    resp = http.post(path, json={**body, "max_tokens": 3, **extra})
    if param is None:
        assert resp.status_code == 422, resp.text
        return
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param
