"""/metrics, parsed by prometheus_client: counters move by exactly the traffic sent."""

from __future__ import annotations

from tests.servers import metric_samples


def delta(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_token_counters_rise_by_exactly_the_tokens(server, client, http):
    before = metric_samples(server.url)
    usages = [
        client.completions.create(model="base", prompt=["one two", "three"], n=2, max_tokens=5, temperature=0.5,
                                  seed=1, extra_body={"ignore_eos": True}).usage,
        client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hey"}], max_tokens=4,
                                       temperature=0, extra_body={"ignore_eos": True}).usage,
    ]
    stream = client.completions.create(model="base", prompt="streamed", max_tokens=6, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    usages.append([c for c in stream][-1].usage)
    gen = http.post("/v1/generate", json={"prompt": "native", "max_tokens": 3, "ignore_eos": True}).json()
    cls = http.post("/v1/classify", json={"text": ["a b c", "d"]}).json()
    after = metric_samples(server.url)

    prompt = sum(u.prompt_tokens for u in usages) + gen["usage"]["prompt_tokens"]
    completion = sum(u.completion_tokens for u in usages) + gen["usage"]["completion_tokens"]
    assert delta(before, after, "lmservice_prompt_tokens_total", model="base") == prompt
    assert delta(before, after, "lmservice_generation_tokens_total", model="base") == completion
    assert delta(before, after, "lmservice_prompt_tokens_total", model="cls") == cls["usage"]["prompt_tokens"]
    assert delta(before, after, "lmservice_generation_tokens_total", model="cls") == 0
    assert delta(before, after, "lmservice_requests_total", endpoint="/v1/completions", model="base",
                 status="200") == 2
    assert delta(before, after, "lmservice_requests_total", endpoint="/v1/classify", model="cls", status="200") == 1
    # one TTFT per engine request that produced tokens: 2 prompts + chat + stream + generate
    assert delta(before, after, "lmservice_time_to_first_token_seconds_count", model="base") == 5
    assert delta(before, after, "lmservice_e2e_request_latency_seconds_count", model="base") == 5
    assert delta(before, after, "lmservice_batch_size_count") > 0
    assert 0.0 <= after[("lmservice_kv_cache_usage_perc", ())] <= 1.0
    assert after[("lmservice_num_requests_running", ())] == 0
    assert after[("lmservice_loaded_adapters", ())] >= 2


def test_the_kv_cache_is_described_once(server):
    """Its bytes and an info series whose labels carry the format, block size and block count (as vLLM's
    cache_config_info); the test server stores the model's dtype (auto: fp32 on a CPU)."""
    samples = metric_samples(server.url)
    info = [dict(labels) for (name, labels), value in samples.items() if name == "lmservice_cache_config_info"
            and value == 1]
    assert len(info) == 1 and info[0]["kv_cache_dtype"] == "fp32" and int(info[0]["block_size"]) >= 1
    bytes_per_block = samples[("lmservice_kv_cache_bytes", ())] / int(info[0]["num_kv_blocks"])
    assert bytes_per_block > 0 and bytes_per_block % (2 * 4 * int(info[0]["block_size"])) == 0  # K and V, fp32
