"""Native endpoints: generate, classify (against PEFT), translate (card template and languages)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoTokenizer, GPT2ForSequenceClassification

from tests.servers import LABELS, TRANSLATE_CARD, sse_events


def test_generate_plain_with_logprobs(http):
    resp = http.post("/v1/generate", json={"prompt": "Hello", "max_tokens": 5, "temperature": 0,
                                           "ignore_eos": True, "logprobs": 2})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model"] == "base" and body["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5 and len(body["logprobs"]) == 5
    assert "".join(t["token"] for t in body["logprobs"]) == body["text"]
    for t in body["logprobs"]:
        assert t["top"][0]["logprob"] == pytest.approx(t["logprob"], abs=1e-5)  # greedy picks the top-1


def test_classify_matches_peft(http, model_dirs):
    texts = ["a fine film", "dull and long"]
    resp = http.post("/v1/classify", json={"text": texts})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model"] == "cls"  # the first model able to classify
    tok = AutoTokenizer.from_pretrained(model_dirs["base"])
    base = GPT2ForSequenceClassification.from_pretrained(model_dirs["base"], num_labels=len(LABELS), pad_token_id=0)
    model = PeftModel.from_pretrained(base, model_dirs["adapters"] / "cls").eval()
    for text, result in zip(texts, body["results"], strict=True):
        with torch.no_grad():
            probs = model(torch.tensor([tok.encode(text)])).logits.softmax(-1)[0].tolist()
        assert list(result["scores"]) == LABELS
        assert list(result["scores"].values()) == pytest.approx(probs, abs=1e-4)
        assert result["label"] == LABELS[max(range(len(probs)), key=probs.__getitem__)]
        assert result["score"] == pytest.approx(max(probs), abs=1e-4)
    assert body["usage"]["prompt_tokens"] == sum(len(tok.encode(t)) for t in texts)
    one = http.post("/v1/classify", json={"model": "cls", "text": texts[0]}).json()
    assert one["results"][0]["scores"] == pytest.approx(body["results"][0]["scores"], abs=1e-5)


def test_classify_errors(http):
    assert http.post("/v1/classify", json={"model": "base", "text": "x"}).status_code == 400  # cannot classify
    assert http.post("/v1/classify", json={"model": "nope", "text": "x"}).status_code == 404
    assert http.post("/v1/classify", json={"text": []}).json()["error"]["param"] == "text"


def test_translate_uses_the_card_template(http):
    text = "A dog runs."
    resp = http.post("/v1/translate", json={"text": [text, "Two cats."], "source": "en", "target": "de",
                                            "max_tokens": 8, "num_beams": 1})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["model"], body["source"], body["target"]) == ("tr", "en", "de")
    assert len(body["translations"]) == 2
    # Same as a greedy completion of the card's rendered prompt on the same adapter.
    prompt = TRANSLATE_CARD["prompt_template"].replace("{text}", text)
    comp = http.post("/v1/completions", json={"model": "tr", "prompt": prompt, "max_tokens": 8,
                                              "temperature": 0}).json()
    assert body["translations"][0]["text"] == comp["choices"][0]["text"].strip()
    with http.stream("POST", "/v1/translate", json={"text": text, "max_tokens": 8, "num_beams": 1,
                                                    "stream": True}) as r:
        chunks = [json.loads(e) for e in sse_events(b"".join(r.iter_raw()))[:-1]]
    assert "".join(c["text"] for c in chunks).strip() == body["translations"][0]["text"]


def test_translate_language_mismatch_is_400(http):
    for body, param in (({"text": "x", "source": "de", "target": "en"}, "source"),
                        ({"model": "tr", "text": "x", "source": "en", "target": "fr"}, "target")):
        resp = http.post("/v1/translate", json=body)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text
    assert http.post("/v1/translate", json={"model": "cls", "text": "x"}).status_code == 400
