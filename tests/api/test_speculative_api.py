"""Speculative decoding through a real server: the same completions as a server without it, and its counters
in /metrics (parsed by prometheus_client)."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.servers import API_KEY, metric_samples, start_server, wait_kv_idle

AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPTS = ["one two three one two three one two", "the cat sat on the mat. the cat sat on the", "a b c d a b c d a b"]


@pytest.fixture(scope="module")
def spec_server(model_dirs, tmp_path_factory):
    srv = start_server(model_dirs, tmp_path_factory, "spec", "--speculative", "ngram", "--num-speculative-tokens",
                       "3", "--speculative-disable-batch-size", "8", "--api-key", API_KEY)
    yield srv
    srv.stop()


def test_same_completions_and_counters(server, spec_server):
    body = {"model": "base", "prompt": PROMPTS, "max_tokens": 24, "temperature": 0, "logprobs": 2}
    want = httpx.post(server.url + "/v1/completions", json=body, headers=AUTH, timeout=60).json()
    got = httpx.post(spec_server.url + "/v1/completions", json=body, headers=AUTH, timeout=60).json()
    assert [c["text"] for c in got["choices"]] == [c["text"] for c in want["choices"]]
    assert [c["logprobs"]["tokens"] for c in got["choices"]] == [c["logprobs"]["tokens"] for c in want["choices"]]
    assert got["usage"] == want["usage"]
    # the streamed form too (several tokens can arrive in one event)
    with httpx.stream("POST", spec_server.url + "/v1/completions", json={**body, "prompt": PROMPTS[0], "stream": True},
                      headers=AUTH, timeout=60) as r:
        text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in r.iter_lines()
                       if line.startswith("data: {"))
    assert text == want["choices"][0]["text"]
    assert wait_kv_idle(spec_server.url) == 0.0
    m = metric_samples(spec_server.url)
    drafts = m[("lmservice_spec_decode_num_draft_tokens_total", ())]
    accepted = m[("lmservice_spec_decode_num_accepted_tokens_total", ())]
    emitted = m[("lmservice_spec_decode_num_emitted_tokens_total", ())]
    assert drafts > 0 and 0 < accepted <= drafts
    assert emitted == accepted + m[("lmservice_spec_decode_num_drafts_total", ())]
    per_pos = {labels: v for (name, labels), v in m.items() if name == "lmservice_spec_decode_num_accepted_tokens_per_pos_total"}
    assert sum(per_pos.values()) == accepted and (("position", "0"),) in per_pos
    # a server without speculation exports the counters at 0
    assert metric_samples(server.url, AUTH)[("lmservice_spec_decode_num_drafts_total", ())] == 0
