"""What the HTTP layer holds for the life of the process: settings, the engine and its models, metrics,
drain state."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lmservice.api.errors import APIError
from lmservice.api.tokenizing import PromptTokenizer
from lmservice.config import Settings
from lmservice.engine.speculative import SpecDecodeStats
from lmservice.metrics import Metrics

if TYPE_CHECKING:
    from lmservice.engine.async_engine import AsyncEngine
    from lmservice.serving.bootstrap import Serving
    from lmservice.serving.models import ModelRegistry
    from lmservice.serving.structured import GrammarCompiler


@dataclass
class _Cumulative:
    """Last seen values of the engine's cumulative stats, to turn them into Prometheus counter increments."""

    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    num_steps: int = 0  # cursor: step samples before this index are in the histograms
    spec: SpecDecodeStats = field(default_factory=SpecDecodeStats)


@dataclass
class ServerState:
    """One per app. Invariant: `in_flight` holds exactly the engine request ids that an HTTP handler
    is still waiting on; draining waits for it to empty, then aborts what is left."""

    settings: Settings
    metrics: Metrics
    engine: AsyncEngine | None = None
    models: ModelRegistry | None = None
    grammars: GrammarCompiler | None = None
    tokenizing: PromptTokenizer | None = None
    is_draining: bool = False
    in_flight: set[str] = field(default_factory=set)
    started_at: float = field(default_factory=time.time)
    _seen: _Cumulative = field(default_factory=_Cumulative)

    def serve(self, serving: Serving) -> None:
        self.engine, self.models, self.grammars = serving.engine, serving.models, serving.grammars
        self.tokenizing = PromptTokenizer(serving.engine.tokenizer, serving.engine.max_model_len)
        kv = serving.engine.kv_cache
        self.metrics.kv_cache_bytes.set(kv["bytes"])
        self.metrics.cache_config_info.labels(kv["dtype"], str(kv["block_size"]), str(kv["num_blocks"])).set(1)

    def started(self) -> tuple[AsyncEngine, ModelRegistry]:
        """The engine and its models, or 503 before they are loaded."""
        if self.engine is None or self.models is None:
            raise APIError(503, "server is not ready")
        return self.engine, self.models

    def is_ready(self) -> bool:
        return self.engine is not None and self.engine.is_alive() and not self.is_draining

    async def drain(self, timeout_s: float) -> int:
        """Stop admitting (ready -> 503), wait up to `timeout_s` for in-flight requests to finish,
        abort the rest. Returns how many were aborted."""
        self.is_draining = True
        self.metrics.draining.set(1)
        deadline = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return await self.abort_all(2.0)

    async def abort_all(self, grace_s: float) -> int:
        """Stop admitting, abort every in-flight request and give their handlers up to `grace_s`
        to see their streams end and answer. Returns how many were aborted."""
        self.is_draining = True
        self.metrics.draining.set(1)
        left = list(self.in_flight)
        if self.engine is not None:
            for request_id in left:
                self.engine.abort(request_id)
        deadline = time.monotonic() + grace_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return len(left)

    def refresh_engine_metrics(self) -> None:
        """Copy the engine's stats into the gauges and counters (called on every scrape of /metrics).
        Reads only: concurrent scrapes each see every step sample once in the histograms (the
        cursor is this state's, the histograms are the process's)."""
        if self.engine is None:
            return
        m, stats = self.metrics, self.engine.stats()
        m.num_requests_running.set(stats.num_running)
        m.num_requests_waiting.set(stats.num_waiting)
        m.kv_cache_usage_perc.set(stats.num_kv_blocks_used / max(1, stats.num_kv_blocks_total))
        seen = self._seen
        m.prefix_cache_queries.inc(max(0, stats.prefix_cache_queries - seen.prefix_cache_queries))
        m.prefix_cache_hits.inc(max(0, stats.prefix_cache_hits - seen.prefix_cache_hits))
        m.num_preemptions.inc(max(0, stats.num_preemptions - seen.num_preemptions))
        seen.prefix_cache_queries = stats.prefix_cache_queries
        seen.prefix_cache_hits = stats.prefix_cache_hits
        seen.num_preemptions = stats.num_preemptions
        if stats.prefix_cache_queries:
            m.prefix_cache_hit_ratio.set(stats.prefix_cache_hits / stats.prefix_cache_queries)
        if stats.spec is not None:
            self._refresh_spec_metrics(stats.spec)
        samples, seen.num_steps = self.engine.step_samples_since(seen.num_steps)
        for num_seqs, num_tokens in samples:
            m.batch_size.observe(num_seqs)
            m.batch_tokens.observe(num_tokens)
        if self.models is not None:
            m.loaded_adapters.set(self.models.num_adapters)

    def _refresh_spec_metrics(self, spec: SpecDecodeStats) -> None:
        m, seen = self.metrics, self._seen.spec
        m.spec_decode_num_drafts.inc(max(0, spec.num_drafts - seen.num_drafts))
        m.spec_decode_num_draft_tokens.inc(max(0, spec.num_draft_tokens - seen.num_draft_tokens))
        m.spec_decode_num_accepted_tokens.inc(max(0, spec.num_accepted_tokens - seen.num_accepted_tokens))
        m.spec_decode_num_emitted_tokens.inc(max(0, spec.num_emitted_tokens - seen.num_emitted_tokens))
        for pos, count in enumerate(spec.accepted_per_pos):
            before = seen.accepted_per_pos[pos] if pos < len(seen.accepted_per_pos) else 0
            m.spec_decode_num_accepted_tokens_per_pos.labels(position=str(pos)).inc(max(0, count - before))
        self._seen.spec = spec
