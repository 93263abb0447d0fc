"""The synchronous engine: add requests, abort them, step. A step reads as schedule, run, update.

`EngineConfig` lives in lmservice/engine/config.py (torch-free, so Settings can read its defaults);
it is re-exported here.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, replace

import torch

from lmservice.engine.adapters import AdapterTable
from lmservice.engine.beam import BeamSearch, beam_params
from lmservice.engine.block_pool import BlockPool
from lmservice.engine.config import EngineConfig
from lmservice.engine.detokenizer import IncrementalDetokenizer
from lmservice.engine.engine_request import EngineRequest, EngineTask, RequestValidator
from lmservice.engine.kv_cache_manager import KVCacheManager
from lmservice.engine.kv_cache_tensors import kv_cache_bytes_per_block, resolve_kv_cache_dtype
from lmservice.engine.model_runner import ModelRunner, ModelRunnerOutput
from lmservice.engine.outputs import CompletionDelta, RequestOutput, RequestRejectedError, TokenLogprob
from lmservice.engine.request import Sequence
from lmservice.engine.sampling_params import SamplingParams
from lmservice.engine.scheduler import Scheduler, SchedulerOutput
from lmservice.engine.speculative import SpecDecodeStats, Speculator
from lmservice.engine.stop_strings import StopStrings
from lmservice.kernels import choose_kernels
from lmservice.model.card import ModelCard
from lmservice.model.loader import LoadedModel
from lmservice.model.lora import LoRAAdapter, LoRATargets, read_adapter

log = logging.getLogger("lmservice.engine")


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_waiting_tokens: int
    num_kv_blocks_total: int
    num_kv_blocks_used: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    spec: SpecDecodeStats | None = None  # None: speculative decoding is off


@dataclass(eq=False)
class _Group:
    """The n sequences of one request and what has not been reported yet."""

    request_id: str
    seqs: list[Sequence]
    detoks: list[IncrementalDetokenizer | None]
    pending_tokens: list[list[int]]
    pending_logprobs: list[list[TokenLogprob]]
    prompt_logprobs: list[TokenLogprob | None] | None
    scores: list[float] | None = None
    embedding: list[float] | None = None
    sent_prompt_logprobs: bool = False
    error: str | None = None
    beam: BeamSearch | None = None  # a beam search (seqs: its live beams), reported only when it ends

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class Engine:
    """Continuous-batching engine over one base model on one device."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        self.loaded = loaded
        self.config = config
        self.tokenizer = loaded.tokenizer
        self.max_model_len = loaded.config.n_positions
        self.vocab_size = loaded.config.vocab_size
        self.eos_token_id = loaded.tokenizer.eos_token_id
        if self.eos_token_id is None:
            self.eos_token_id = loaded.config.eos_token_id
        # the kernel set and the CPU-kernel policy, decided once (lmservice/kernels/cpu_policy.py)
        self.ops, self.cpu_kernels = choose_kernels(config.attention_backend, config.cpu_kernels, loaded.device,
                                                    loaded.dtype)
        kv_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, loaded.dtype, loaded.quantization)
        num_blocks = config.num_kv_blocks or max(
            1, config.kv_cache_memory_mb * 2**20 // kv_cache_bytes_per_block(loaded.config, config.block_size, kv_dtype))
        self.pool = BlockPool(num_blocks, config.block_size)
        self.validator = RequestValidator(vocab_size=self.vocab_size, max_model_len=self.max_model_len,
                                          block_size=config.block_size, num_kv_blocks=num_blocks,
                                          limits=config.limits, max_num_seqs=config.scheduler.max_num_seqs)
        score = loaded.model.score
        self.adapters = AdapterTable(LoRATargets.from_config(loaded.config), config.scheduler.max_loras,
                                     config.max_lora_rank, loaded.device, loaded.dtype,
                                     base_score_head=(score.weight, None) if score is not None else None)
        self.scheduler = Scheduler(config.scheduler, KVCacheManager(self.pool, config.enable_prefix_caching),
                                   adapters_fit=self.adapters.can_acquire)
        self.runner = ModelRunner(
            model=loaded.model, ops=self.ops, num_blocks=num_blocks, block_size=config.block_size,
            device=loaded.device, dtype=loaded.dtype, eos_token_id=self.eos_token_id, seed=config.seed,
            cuda_graph_max_batch=config.scheduler.max_num_seqs if config.enable_cuda_graphs else 0,
            adapters=self.adapters, cpu_kernels=self.cpu_kernels, kv_cache_dtype=kv_dtype)
        self.speculator = Speculator.build(config, loaded, self)
        self.spec_stats = SpecDecodeStats() if self.speculator is not None else None
        if self.speculator is not None:
            log.info("speculative decoding: %s", self.speculator.name)
        self.groups: dict[str, _Group] = {}
        # NOTE: (step index, num_seqs, num_tokens) of recent steps, appended by the engine thread and read
        # by scrapes (step_samples_since); reading never removes, so any number of readers see every sample.
        self.step_samples: deque[tuple[int, int, int]] = deque(maxlen=10_000)
        self.num_steps = 0
        kv = self.runner.kv_cache.describe()
        log.info("engine ready: %d KV blocks of %d tokens (%s, %.1f MiB), %s kernels; CPU kernels %s", num_blocks,
                 config.block_size, kv["dtype"], kv["bytes"] / 2**20, self.ops.name, self.cpu_kernels.describe())
        if num_blocks * config.block_size < self.max_model_len:
            log.warning("the KV cache (%d tokens) is smaller than one full context (%d): long requests are refused",
                        num_blocks * config.block_size, self.max_model_len)

    # --- adapters ---
    def add_adapter(self, name: str, path) -> tuple[LoRAAdapter, ModelCard]:
        """Read a PEFT LoRA directory (and its card) here and serve it as `name` (the CLI, benchmarks, tests);
        a broken one raises ValueError, changing nothing. The server reads adapters on a thread of their own
        and hands them to `serve_adapter`."""
        adapter, card = read_adapter(path, self.adapters.targets, self.adapters.max_lora_rank, name)
        self.serve_adapter(adapter)
        return adapter, card

    def serve_adapter(self, adapter: LoRAAdapter) -> None:
        """Serve an adapter already read; ValueError, changing nothing, when it does not fit or its name is in use."""
        self.adapters.add(adapter)

    def remove_adapter(self, name: str) -> None:
        """New requests can no longer name it; requests in flight keep it until they end. KeyError if unknown."""
        self.adapters.remove(name)

    # --- requests ---
    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
               task: EngineTask = "generate", adapter: str | None = None, priority: int = 0,
               grammar: object | None = None) -> EngineRequest:
        """The synchronous entry (the CLI, benchmarks, tests): validate, check the waiting-queue bounds and
        queue; raises RequestRejectedError or QueueFullError, changing nothing."""
        if request_id in self.groups:
            raise RequestRejectedError(f"request id {request_id!r} is already in use", "request_id")
        request = self.validator.check(request_id, prompt_token_ids, params, task=task, adapter=adapter,
                                       priority=priority, grammar=grammar)
        self.check_fits(request.num_seqs, request.num_prompt_tokens)
        self.check_admission(request.num_seqs, request.num_prompt_tokens)
        self.add_request(request)
        return request

    def check_admission(self, num_seqs: int, num_prompt_tokens: int) -> None:
        """QueueFullError when the bounded waiting queue cannot take this many more."""
        self.scheduler.check_admission(num_seqs, num_prompt_tokens)

    def check_fits(self, num_seqs: int, num_prompt_tokens: int) -> None:
        """RequestRejectedError when a request alone is larger than the waiting queue's bounds."""
        self.scheduler.check_fits(num_seqs, num_prompt_tokens)

    def add_request(self, request: EngineRequest) -> None:
        """Queue a request that RequestValidator.check made, as it is (no validation, no admission check:
        the caller did both). KeyError, changing nothing, if its adapter is no longer loaded."""
        adapter, params = request.adapter, request.params
        # kept until the request ends, even if removed meanwhile; KeyError when it is unknown or removed
        adapter_key = self.adapters.pin(adapter) if adapter is not None else None
        seqs = []
        now = time.monotonic()
        is_beam_search = params.num_beams > 1 and request.task == "generate"
        for i in range(request.num_seqs):
            seq = Sequence(seq_id=f"{request.request_id}#{i}", group_id=request.request_id, index=i,
                           prompt_token_ids=list(request.prompt_token_ids),
                           params=beam_params(params) if is_beam_search else params,
                           max_tokens=request.max_tokens, priority=request.priority, adapter=adapter,
                           adapter_load_id=adapter_key[1] if adapter_key else None,
                           task=request.task, arrival_time=now)
            if params.seed is not None and not params.is_greedy:
                seq.generator = torch.Generator().manual_seed((params.seed + i) % 2**64)
            if request.grammar is not None:
                seq.grammar = request.grammar.deep_copy()
            seqs.append(seq)
        generates = request.task == "generate"
        stops = StopStrings(params.stop) if params.stop and generates else None
        detoks = [IncrementalDetokenizer(self.tokenizer, stops, params.include_stop_str_in_output,
                                         params.skip_special_tokens) if generates else None for _ in seqs]
        self.groups[request.request_id] = _Group(
            request.request_id, seqs, detoks, [[] for _ in seqs], [[] for _ in seqs],
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
            beam=BeamSearch(seqs[0], self.eos_token_id) if is_beam_search else None)
        for seq in seqs:
            self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now; its blocks are free before the next step."""
        group = self.groups.get(request_id)
        if group is None:
            return None
        for seq in group.seqs:
            self.scheduler.finish(seq, "abort")
        return self._collect(group)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def has_running(self) -> bool:
        """Whether any sequence holds KV blocks (a step that scheduled nothing while this is False waits)."""
        return bool(self.scheduler.running)

    # --- the step ---
    def step(self) -> list[RequestOutput]:
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running, self.max_model_len)
        sched = self.scheduler.schedule()
        self._restart_beam_searches(sched.preempted)
        if sched.is_empty:
            return []
        try:
            lora = self.adapters.step_hook([item.seq.adapter for item in sched.scheduled],
                                           [item.num_new_tokens for item in sched.scheduled], self.ops.add_lora)
            if self.speculator is not None:
                self.speculator.fill(sched)
            result = self.runner.execute(sched, lora)
        except Exception as e:  # noqa: BLE001 (one bad batch must not stop the server)
            return self._fail_batch(sched, e)
        self.step_samples.append((self.num_steps, len(sched.scheduled), sched.num_batched_tokens))
        self.num_steps += 1
        return self.update(sched, result)

    def update(self, sched: SchedulerOutput, result: ModelRunnerOutput) -> list[RequestOutput]:
        now = time.monotonic()
        touched: dict[str, _Group] = {}
        for i, item in enumerate(sched.scheduled):
            seq = item.seq
            start = seq.num_computed_tokens
            seq.num_computed_tokens += item.num_new_tokens - len(item.spec_token_ids)
            group = self.groups[seq.group_id]
            touched[group.request_id] = group
            if seq.is_finished:  # a sibling's failure already ended it
                continue
            try:
                if i in result.errors:
                    raise RuntimeError(result.errors[i])
                if i in result.prompt_logprobs and group.prompt_logprobs is not None and seq.index == 0:
                    # entry k is position start + 1 + k; a preempted sequence recomputes positions it already reported
                    chunk = result.prompt_logprobs[i]
                    group.prompt_logprobs.extend(chunk[len(group.prompt_logprobs) - (start + 1):])
                if i in result.scores:
                    group.scores = result.scores[i]
                    self.scheduler.finish(seq, "stop")
                elif i in result.embeddings:
                    group.embedding = result.embeddings[i]
                    self.scheduler.finish(seq, "stop")
                elif seq.max_tokens == 0 and seq.num_computed_tokens >= seq.num_tokens:
                    self.scheduler.finish(seq, "length")  # prompt only (echo + logprobs scoring)
                elif i in result.sampled and group.beam is not None:
                    group.beam.report(seq, result.sampled[i][1].top)
                elif i in result.sampled:
                    token_id, logprob = result.sampled[i]
                    self._append_token(group, seq, token_id, logprob, now)
                elif i in result.emitted:
                    self._append_verified(group, seq, item.spec_token_ids, result.emitted[i], now)
            except Exception as e:  # noqa: BLE001 (fails this request alone)
                log.warning("request %s failed: %s", group.request_id, e)
                self._fail_group(group, e)
        for group in touched.values():
            if group.beam is not None and group.beam.is_ready and not group.finished:
                self._advance_beams(group, now)
        return [self._collect(g) for g in touched.values()]

    def _advance_beams(self, group: _Group, now: float) -> None:
        try:
            group.beam.advance(self.scheduler, now)
        except Exception as e:  # noqa: BLE001 (fails this request alone)
            log.warning("request %s failed: %s", group.request_id, e)
            self._fail_group(group, e)
        group.seqs = group.beam.seqs

    def _restart_beam_searches(self, preempted: list[Sequence]) -> None:
        """A preempted beam search starts again from its prompt (the scheduler preempted all its beams)."""
        for request_id in dict.fromkeys(seq.group_id for seq in preempted):
            group = self.groups[request_id]
            if group.beam is not None:
                group.beam.restart(self.scheduler)
                group.seqs = group.beam.seqs

    def _append_verified(self, group: _Group, seq: Sequence, guesses: list[int],
                         emitted: list[tuple[int, TokenLogprob | None]], now: float) -> None:
        """A speculating row's tokens, one by one (each checked for stops and limits, so nothing overshoots);
        the accepted guesses' KV is already in the cache, the blocks past the sequence go back to the pool."""
        appended = 0
        for j, (token_id, logprob) in enumerate(emitted):
            self._append_token(group, seq, token_id, logprob, now)
            appended += 1
            if seq.is_finished:
                break
            if j < len(emitted) - 1:  # an accepted guess: computed in this step
                seq.num_computed_tokens += 1
        # counted as emitted: a stop inside the accepted guesses leaves the rest unused
        self.spec_stats.record(len(guesses), appended, min(appended, len(emitted) - 1))
        if not seq.is_finished:
            self.scheduler.kv.trim(seq)

    def _fail_group(self, group: _Group, error: Exception) -> None:
        group.error = f"{type(error).__name__}: {error}"
        for seq in group.seqs:
            self.scheduler.finish(seq, "error")

    def _append_token(self, group: _Group, seq: Sequence, token_id: int, logprob: TokenLogprob | None,
                      now: float) -> None:
        params = seq.params
        seq.output_token_ids.append(token_id)
        if seq.first_token_time is None:
            seq.first_token_time = now
        group.pending_tokens[seq.index].append(token_id)
        if logprob is not None:
            group.pending_logprobs[seq.index].append(logprob)
        num_out = seq.num_output_tokens
        if seq.grammar is not None and not seq.grammar.consume_token(token_id):
            raise RuntimeError(f"the grammar refused token {token_id}: {seq.grammar.get_error()[:200]}")
        if num_out >= params.min_tokens:
            if token_id == self.eos_token_id and not params.ignore_eos:
                return self.scheduler.finish(seq, "stop", None)
            if token_id in params.stop_token_ids:
                return self.scheduler.finish(seq, "stop", token_id)
        stop = group.detoks[seq.index].add_token(token_id, check_stop=num_out >= params.min_tokens)
        if stop is not None:
            return self.scheduler.finish(seq, "stop", stop)
        if seq.grammar is not None and seq.grammar.is_stopped():  # complete: only EOS could follow
            return self.scheduler.finish(seq, "stop")
        if num_out >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            self.scheduler.finish(seq, "length")

    def _collect(self, group: _Group) -> RequestOutput:
        """The group's RequestOutput event with everything not yet reported."""
        deltas = self._beam_outputs(group) if group.beam is not None else self._new_deltas(group)
        finished = group.finished
        first = group.seqs[0]
        out = RequestOutput(
            request_id=group.request_id, outputs=deltas, finished=finished,
            num_prompt_tokens=first.num_prompt_tokens,
            num_generated_tokens=sum(len(d.token_ids) for d in deltas) if group.beam is not None
            else sum(s.num_output_tokens for s in group.seqs),
            num_cached_tokens=first.num_cached_tokens,
            scores=group.scores, embedding=group.embedding, error=group.error, arrival_time=first.arrival_time,
            first_scheduled_time=first.first_scheduled_time,
            first_token_time=min((s.first_token_time for s in group.seqs if s.first_token_time), default=None))
        if group.prompt_logprobs is not None and not group.sent_prompt_logprobs and (
                first.num_computed_tokens >= first.num_prompt_tokens or finished):
            out.prompt_logprobs = list(group.prompt_logprobs)
            group.sent_prompt_logprobs = True
        if finished:
            del self.groups[group.request_id]
            if first.adapter_key is not None:
                self.adapters.release(first.adapter_key)
        return out

    def _beam_outputs(self, group: _Group) -> list[CompletionDelta]:
        """Nothing until the search ends, then its n best hypotheses whole."""
        if not group.finished:
            return []
        skip_special_tokens = group.seqs[0].params.skip_special_tokens

        def detokenize(token_ids: list[int]) -> str:
            detok = IncrementalDetokenizer(self.tokenizer, None, False, skip_special_tokens)
            for token_id in token_ids:
                detok.add_token(token_id)
            return detok.take_delta(True)

        try:
            return group.beam.outputs(detokenize)
        except Exception as e:  # noqa: BLE001 (a detokenizer error fails this request alone)
            log.warning("request %s failed while detokenizing: %s", group.request_id, e)
            group.error = f"{type(e).__name__}: {e}"
            return []

    def _new_deltas(self, group: _Group) -> list[CompletionDelta]:
        """What each sequence produced since the last output."""
        try:
            texts = [detok.take_delta(seq.is_finished) if detok is not None else ""
                     for seq, detok in zip(group.seqs, group.detoks, strict=True)]
        except Exception as e:  # noqa: BLE001 (a detokenizer error fails this request alone)
            log.warning("request %s failed while detokenizing: %s", group.request_id, e)
            if group.finished:  # the last flush failed: report it on the finished request
                group.error = f"{type(e).__name__}: {e}"
            else:
                self._fail_group(group, e)
            texts = [""] * len(group.seqs)
        deltas = []
        for seq, text in zip(group.seqs, texts, strict=True):
            tokens = group.pending_tokens[seq.index]
            if tokens or text or seq.is_finished:
                logprobs = group.pending_logprobs[seq.index] if seq.params.logprobs is not None else None
                deltas.append(CompletionDelta(seq.index, text, tokens, logprobs,
                                              seq.finish_reason, seq.stop_reason))
                group.pending_tokens[seq.index] = []
                group.pending_logprobs[seq.index] = []
        return deltas

    def _fail_batch(self, sched: SchedulerOutput, error: Exception) -> list[RequestOutput]:
        """A forward that raised: fail its requests alone, keep serving the rest."""
        log.exception("engine step failed; failing the %d requests of this batch", len(sched.scheduled))
        groups = {item.seq.group_id: self.groups[item.seq.group_id] for item in sched.scheduled}
        for group in groups.values():
            self._fail_group(group, error)
        return [self._collect(g) for g in groups.values()]

    def stats(self) -> EngineStats:
        """Counters now: plain reads, safe from another thread, changing nothing."""
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=self.scheduler.num_waiting,
            num_waiting_tokens=self.scheduler.num_waiting_tokens, num_kv_blocks_total=self.pool.num_blocks,
            num_kv_blocks_used=self.pool.num_used_blocks, prefix_cache_queries=self.pool.num_queries,
            prefix_cache_hits=self.pool.num_hits, num_preemptions=self.scheduler.num_preemptions,
            spec=replace(self.spec_stats, accepted_per_pos=list(self.spec_stats.accepted_per_pos))
            if self.spec_stats is not None else None)

    def step_samples_since(self, num_seen: int) -> tuple[list[tuple[int, int]], int]:
        """(num_seqs, num_tokens) of every kept step (the last 10,000) with index >= num_seen, and the
        index to pass next time. Nothing is removed: each reader keeps its own cursor."""
        recent = [sample for sample in list(self.step_samples) if sample[0] >= num_seen]
        next_seen = recent[-1][0] + 1 if recent else num_seen
        return [(num_seqs, num_tokens) for _, num_seqs, num_tokens in recent], next_seen
