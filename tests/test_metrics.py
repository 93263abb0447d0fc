"""lmservice/metrics.py: an unloaded adapter's series go with it, the others stay."""

from __future__ import annotations

from prometheus_client import generate_latest

from lmservice.metrics import Metrics


def test_forget_model_drops_only_that_models_series():
    m = Metrics()
    for name in ("base", "gone"):
        m.requests.labels("/v1/completions", name, "200").inc()
        m.prompt_tokens.labels(name).inc(3)
        m.time_to_first_token.labels(name).observe(0.1)
    m.forget_model("gone")
    text = generate_latest(m.registry).decode()
    assert 'model="gone"' not in text
    assert 'lmservice_requests_total{endpoint="/v1/completions",model="base",status="200"} 1.0' in text
    assert 'lmservice_time_to_first_token_seconds_count{model="base"} 1.0' in text
    m.forget_model("never-served")  # nothing to drop: no error
