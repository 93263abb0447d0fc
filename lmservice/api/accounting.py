"""Latency and usage of one HTTP request's engine requests: into the Prometheus metrics and the request's
record (the access log line, the trace).

A `CallRecorder` is told of the admission (`admitted`), of every engine output as it is collected (`observe`)
and of the end (`count`); it changes nothing but the metrics and the record.
"""

from __future__ import annotations

import time

from lmservice.api.middleware import EngineTimes, RequestRecord
from lmservice.api.results import PromptRun
from lmservice.api.schemas.common import Usage
from lmservice.engine.outputs import RequestOutput
from lmservice.engine.sampling_params import SamplingParams
from lmservice.metrics import Metrics


def usage_of(runs: list[PromptRun]) -> Usage:
    """Tokens of the prompts and of every sequence generated so far."""
    prompt = sum(r.num_prompt_tokens for r in runs)
    completion = sum(r.num_generated_tokens for r in runs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class CallRecorder:
    """Time to first token, queue time, inter-token latency and end-to-end latency per engine request;
    prompt and generated tokens once per HTTP request (`count`, from the call's idempotent close)."""

    def __init__(self, metrics: Metrics, record: RequestRecord, model: str, keep_prompts: bool,
                 adapter: str | None = None) -> None:
        self.metrics, self.record, self.model = metrics, record, model
        self.keep_prompts = keep_prompts  # prompts and outputs into the record (for the log or the trace)
        self.arrival = time.monotonic()  # the engine's own arrival time wins when it reports one
        record.model, record.adapter = model, adapter

    def admitted(self, call_id: str, params: SamplingParams | None, num_requests: int) -> None:
        self.record.response_id, self.record.params = call_id, params
        self.record.num_engine_requests += num_requests

    def observe(self, run: PromptRun, out: RequestOutput, new_tokens: int) -> None:
        """`out` was just applied to `run`, bringing `new_tokens` tokens."""
        now = time.monotonic()
        m, model, arrival = self.metrics, self.model, out.arrival_time or self.arrival
        _note_times(self.record.times, arrival, out, now)
        if new_tokens and run.last_token_time is None:
            ttft = max(0.0, (out.first_token_time or now) - arrival)
            m.time_to_first_token.labels(model).observe(ttft)
            if out.first_scheduled_time is not None:
                queue_s = max(0.0, out.first_scheduled_time - arrival)
                m.request_queue_time.labels(model).observe(queue_s)
                self.record.queue_ms = self.record.queue_ms or round(queue_s * 1000, 2)
            self.record.ttft_ms = self.record.ttft_ms or round(ttft * 1000, 2)
        elif new_tokens:
            # Tokens that arrive together (the event loop lagged a step) share the gap evenly.
            gap = (now - run.last_token_time) / new_tokens
            for _ in range(new_tokens):
                m.inter_token_latency.labels(model).observe(gap)
        if new_tokens:
            run.last_token_time = now
        if out.finished:
            self.record.finish_reasons.extend(s.finish_reason or "" for s in run.sequences)
            m.e2e_request_latency.labels(model).observe(max(0.0, now - arrival))

    def count(self, runs: list[PromptRun]) -> None:
        """Tokens of every run, finished or not (a run aborted before its first output counts none)."""
        for run in runs:
            num_prompt = run.num_prompt_tokens or (len(run.prompt_token_ids) if run.is_finished else 0)
            self.metrics.prompt_tokens.labels(self.model).inc(num_prompt)
            self.metrics.generation_tokens.labels(self.model).inc(run.num_generated_tokens)
            self.record.prompt_tokens += num_prompt
            self.record.completion_tokens += run.num_generated_tokens

    def log_prompt(self, prompt: object) -> None:
        if self.keep_prompts:
            self.record.prompt = prompt if isinstance(prompt, str) else repr(prompt)

    def log_output(self, output: object) -> None:
        if self.keep_prompts:
            self.record.output = output if isinstance(output, str) else repr(output)


def _note_times(times: EngineTimes, arrival: float, out: RequestOutput, now: float) -> None:
    """Fold one engine request's timestamps into the call's: the earliest of each, the latest finish."""
    times.arrival = _earliest(times.arrival, arrival)
    times.first_scheduled = _earliest(times.first_scheduled, out.first_scheduled_time)
    times.first_token = _earliest(times.first_token, out.first_token_time)
    if out.finished:
        times.finished = now  # outputs are collected in time order: the last finish is the latest


def _earliest(known: float | None, new: float | None) -> float | None:
    return new if known is None else known if new is None else min(known, new)
