"""The official `openai` client, unchanged, against a real server."""

from __future__ import annotations

import math

import openai
import pytest
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel

from tests.servers import API_KEY

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def hf(model_dirs):
    model = GPT2LMHeadModel.from_pretrained(model_dirs["base"]).eval()
    return model, AutoTokenizer.from_pretrained(model_dirs["base"])


def hf_greedy(hf, prompt: str, max_new_tokens: int) -> list[int]:
    model, tok = hf
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def test_completion_matches_transformers_greedy(client, hf):
    resp = client.completions.create(model="base", prompt=PROMPT, max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True})
    expected = hf_greedy(hf, PROMPT, 12)
    assert resp.object == "text_completion" and resp.model == "base"
    assert resp.choices[0].text == hf[1].decode(expected)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.prompt_tokens == len(hf[1].encode(PROMPT))
    assert resp.usage.completion_tokens == 12
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 12


def test_completion_stream_equals_plain(client):
    kwargs = dict(model="base", prompt=PROMPT, max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    plain = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_completion_n_and_prompt_list(client):
    resp = client.completions.create(model="base", prompt=["Hello there", "General Kenobi"], n=3, max_tokens=6,
                                     temperature=1.0, seed=11, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in resp.choices) == list(range(6))
    assert resp.usage.completion_tokens == 2 * 3 * 6
    # choice i*n + j is sequence j of prompt i: each prompt alone gives the same three texts
    alone = client.completions.create(model="base", prompt="General Kenobi", n=3, max_tokens=6, temperature=1.0,
                                      seed=11, extra_body={"ignore_eos": True})
    by_index = {c.index: c.text for c in resp.choices}
    assert [by_index[3 + j] for j in range(3)] == [c.text for c in sorted(alone.choices, key=lambda c: c.index)]
    ids = client.completions.create(model="base", prompt=[[5, 6, 7], [8, 9]], max_tokens=2, temperature=0)
    assert len(ids.choices) == 2 and ids.usage.prompt_tokens == 5


def test_completion_logprobs_and_echo(client):
    resp = client.completions.create(model="base", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3,
                                     echo=True, extra_body={"ignore_eos": True})
    choice = resp.choices[0]
    lp = choice.logprobs
    n_prompt = resp.usage.prompt_tokens
    assert choice.text.startswith(PROMPT)
    assert len(lp.tokens) == n_prompt + 5 and "".join(lp.tokens) == choice.text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for token, value, top in zip(lp.tokens[n_prompt:], lp.token_logprobs[n_prompt:], lp.top_logprobs[n_prompt:],
                                 strict=True):
        assert len(top) <= 3 and math.isclose(max(top.values()), value, abs_tol=1e-4)  # greedy: chosen is top-1
        assert token in top


def test_chat_plain_and_stream(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    plain = client.chat.completions.create(model="base", messages=messages, max_tokens=10, temperature=0,
                                           logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    msg = plain.choices[0].message
    assert plain.object == "chat.completion" and msg.role == "assistant"
    assert plain.usage.completion_tokens == 10
    assert len(plain.choices[0].logprobs.content) == 10
    stream = list(client.chat.completions.create(model="base", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True}))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == msg.content
    assert stream[-1].choices[0].finish_reason == "length"


def test_chat_uses_the_documented_plain_template(client):
    """GPT-2 has no chat template: "role: content" lines, then "assistant:" (docs/api.md)."""
    messages = [{"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(model="base", messages=messages, max_tokens=4, temperature=0,
                                          extra_body={"ignore_eos": True})
    comp = client.completions.create(model="base", prompt="user: Hi\nassistant:", max_tokens=4, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == comp.choices[0].text
    assert chat.usage.prompt_tokens == comp.usage.prompt_tokens


def test_models_list_and_retrieve(client):
    models = {m.id: m for m in client.models.list()}
    assert list(models) == ["base", "cls", "tr"]
    assert models["cls"].model_extra["tasks"] == ["classify"] and models["cls"].model_extra["parent"] == "base"
    assert "translate" in models["tr"].model_extra["tasks"]
    assert client.models.retrieve("tr").id == "tr"


def test_exceptions_map_from_our_errors(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="base", prompt=PROMPT, max_tokens=5000)  # over the 1024 context
    assert e.value.body["param"] == "max_tokens" and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="base", prompt=PROMPT, n=0)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="base", prompt=PROMPT, extra_body={"stop": 7})
    assert e.value.body["param"] == "stop"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="base", prompt=[5, 1_000_000])
    assert e.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="base", prompt="")
    assert e.value.body["param"] == "prompt"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt=PROMPT)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    with pytest.raises(openai.BadRequestError):  # the classifier cannot generate
        client.completions.create(model="cls", prompt=PROMPT)
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong-" + API_KEY, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="base", prompt=PROMPT, max_tokens="many")  # type: ignore[arg-type]
