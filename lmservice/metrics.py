"""Every Prometheus metric of lmservice, defined in one place.

Names follow vLLM's metric design (num_requests_waiting, kv_cache_usage_perc,
time_to_first_token_seconds, ...) under the `lmservice_` prefix, so dashboards
and autoscalers written for vLLM map one to one. Each process builds one
`Metrics` on its own registry (tests run several servers in one process).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class Metrics:
    """The server's metrics on their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lmservice_requests", "Finished HTTP requests by endpoint, model and status code.",
            ["endpoint", "model", "status"], registry=r)
        self.prompt_tokens = Counter(
            "lmservice_prompt_tokens", "Prompt tokens processed, by model (base or adapter).", ["model"], registry=r)
        self.generation_tokens = Counter(
            "lmservice_generation_tokens", "Tokens generated, by model (base or adapter).", ["model"], registry=r)
        self.time_to_first_token = Histogram(
            "lmservice_time_to_first_token_seconds", "Time from arrival to the first output token.",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            "lmservice_inter_token_latency_seconds", "Time between consecutive output tokens of a request.",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e_request_latency = Histogram(
            "lmservice_e2e_request_latency_seconds", "Time from arrival to the last output of a request.",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.request_queue_time = Histogram(
            "lmservice_request_queue_time_seconds", "Time a request waited before its first scheduling.",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.num_requests_running = Gauge(
            "lmservice_num_requests_running", "Requests in the running batch.", registry=r)
        self.num_requests_waiting = Gauge(
            "lmservice_num_requests_waiting", "Requests waiting to be scheduled.", registry=r)
        self.kv_cache_usage_perc = Gauge(
            "lmservice_kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).", registry=r)
        self.kv_cache_bytes = Gauge(
            "lmservice_kv_cache_bytes", "Memory of the KV-cache block pool, in bytes (int8 scales included).",
            registry=r)
        self.cache_config_info = Gauge(
            "lmservice_cache_config_info", "The KV cache's configuration, in the labels (value 1), as vLLM's "
            "cache_config_info: kv_cache_dtype (fp32, fp16, bf16, int8), block_size, num_kv_blocks.",
            ["kv_cache_dtype", "block_size", "num_kv_blocks"], registry=r)
        self.prefix_cache_queries = Counter(
            "lmservice_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", registry=r)
        self.prefix_cache_hits = Counter(
            "lmservice_prefix_cache_hits", "Prompt tokens found in the prefix cache.", registry=r)
        self.prefix_cache_hit_ratio = Gauge(
            "lmservice_prefix_cache_hit_ratio", "Prefix-cache hits / queries since start (0-1).", registry=r)
        self.num_preemptions = Counter(
            "lmservice_num_preemptions", "Requests preempted (KV blocks freed, recomputed later).", registry=r)
        # speculative decoding (vLLM's spec_decode names); they stay at 0 while --speculative is off
        self.spec_decode_num_drafts = Counter(
            "lmservice_spec_decode_num_drafts", "Sequence-steps that carried speculative guesses.", registry=r)
        self.spec_decode_num_draft_tokens = Counter(
            "lmservice_spec_decode_num_draft_tokens", "Speculative tokens guessed.", registry=r)
        self.spec_decode_num_accepted_tokens = Counter(
            "lmservice_spec_decode_num_accepted_tokens", "Speculative tokens the model agreed with.", registry=r)
        self.spec_decode_num_emitted_tokens = Counter(
            "lmservice_spec_decode_num_emitted_tokens",
            "Tokens emitted by speculating sequence-steps (accepted guesses + the model's own token).", registry=r)
        self.spec_decode_num_accepted_tokens_per_pos = Counter(
            "lmservice_spec_decode_num_accepted_tokens_per_pos",
            "Accepted speculative tokens by position in the guess (0: the first guessed token).",
            ["position"], registry=r)
        self.spec_decode_num_accepted_tokens_per_pos.labels(position="0")  # exported (at 0) from the first scrape
        self.batch_size = Histogram(
            "lmservice_batch_size", "Requests in one engine step.", buckets=_BATCH_BUCKETS, registry=r)
        self.batch_tokens = Histogram(
            "lmservice_batch_tokens", "Tokens in one engine step.", buckets=_BATCH_BUCKETS, registry=r)
        self.loaded_adapters = Gauge(
            "lmservice_loaded_adapters", "LoRA adapters registered with the server.", registry=r)
        # NOTE: no labels, so the series exists (at 0) from the first scrape and increase() sees the first failure.
        self.adapter_load_failures = Counter(
            "lmservice_adapter_load_failures", "Adapters whose files failed to load: POST /v1/adapters answered "
            "400 for them, or the start-up scan of --adapters-dir skipped them (the log names file and reason).",
            registry=r)
        self.draining = Gauge(
            "lmservice_draining", "1 while the server drains after SIGTERM.", registry=r)

    def forget_model(self, name: str) -> None:
        """Drop every series labelled with `model` = `name` (an adapter that was unloaded). NOTE: the series
        of a model live only while it is served: a server that loads and unloads many adapter names would
        otherwise keep a few dozen KB of series per name for ever (and export them at every scrape)."""
        for metric in (self.requests, self.prompt_tokens, self.generation_tokens, self.time_to_first_token,
                       self.inter_token_latency, self.e2e_request_latency, self.request_queue_time):
            names = metric._labelnames  # noqa: SLF001 (prometheus_client offers no public list of children)
            children = {tuple(s.labels[n] for n in names) for family in metric.collect() for s in family.samples
                        if s.labels.get("model") == name}
            for values in children:
                metric.remove(*values)
