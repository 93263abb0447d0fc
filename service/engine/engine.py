"""The synchronous engine: add requests, abort them, step. A step reads as schedule, run, update."""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from kernels import load_ops
from kernels.lora import LoRAMapping
from service.engine.block_pool import BlockPool
from service.engine.detokenizer import IncrementalDetokenizer
from service.engine.kv_cache_manager import KVCacheManager
from service.engine.model_runner import ModelRunner, ModelRunnerOutput, kv_cache_bytes_per_block
from service.engine.outputs import CompletionDelta, RequestOutput, RequestRejectedError, TokenLogprob
from service.engine.request import Sequence
from service.engine.sampling_params import RequestLimits, SamplingParams
from service.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from service.engine.stop_strings import StopStrings
from service.model.card import ModelCard
from service.model.loader import LoadedModel
from service.model.lora import LoRAAdapter, LoRATargets
from service.model.lora_store import LoRAStore

log = logging.getLogger("lmservice.engine")


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    kv_cache_memory_mb: int = 1024
    num_kv_blocks: int | None = None
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 128
    enable_prefix_caching: bool = True
    max_waiting_requests: int = 1024
    max_waiting_tokens: int = 1 << 20
    max_loras: int = 8
    max_lora_rank: int = 64
    attention_backend: str = "auto"  # auto | torch | triton
    enable_cuda_graphs: bool = True  # decode steps as CUDA graphs (CUDA only)
    seed: int = 0
    limits: RequestLimits = RequestLimits()


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
    step_samples: list[tuple[int, int]] = field(default_factory=list)


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
    sent_prompt_logprobs: bool = False
    error: str | None = None

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
        backend = config.attention_backend
        if backend == "auto":
            backend = "triton" if loaded.device.type == "cuda" else "torch"
        num_blocks = config.num_kv_blocks or max(
            1, config.kv_cache_memory_mb * 2**20 // kv_cache_bytes_per_block(loaded.model, config.block_size, loaded.dtype))
        self.pool = BlockPool(num_blocks, config.block_size)
        self.lora = LoRAStore(LoRATargets.from_config(loaded.config), config.max_loras, config.max_lora_rank,
                              loaded.device, loaded.dtype)
        self.adapter_salts: dict[str, str] = {}
        self._num_adapters_loaded = 0
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_batched_tokens, config.max_num_seqs, config.max_waiting_requests,
                            config.max_waiting_tokens, config.max_loras),
            KVCacheManager(self.pool, config.enable_prefix_caching), adapters_fit=self.lora.can_acquire)
        self.ops = load_ops(backend)
        self.runner = ModelRunner(loaded.model, self.ops, num_blocks, config.block_size, loaded.device,
                                  loaded.dtype, self.eos_token_id, config.seed,
                                  cuda_graph_max_batch=config.max_num_seqs if config.enable_cuda_graphs else 0)
        self.groups: dict[str, _Group] = {}
        self.step_samples: deque[tuple[int, int]] = deque(maxlen=10_000)  # (num_seqs, num_tokens) per step
        log.info("engine ready: %d KV blocks of %d tokens, %s kernels", num_blocks, config.block_size, backend)
        if num_blocks * config.block_size < self.max_model_len:
            log.warning("the KV cache (%d tokens) is smaller than one full context (%d): long requests are refused",
                        num_blocks * config.block_size, self.max_model_len)

    # --- adapters ---
    def add_adapter(self, name: str, path) -> tuple[LoRAAdapter, ModelCard]:
        """Load a PEFT LoRA directory (and its card) as `name`; a broken one raises ValueError, changing nothing."""
        card = ModelCard.load(path)
        adapter = self.lora.load(name, path)
        if card is None:
            card = ModelCard(task="classify" if adapter.score_weight is not None else "generate",
                             labels=[f"LABEL_{i}" for i in range(adapter.score_weight.shape[0])]
                             if adapter.score_weight is not None else None)
        self._num_adapters_loaded += 1
        salt = f"{name}#{self._num_adapters_loaded}"  # unique per load: a re-added name never reuses old KV
        self.adapter_salts[name] = salt
        if adapter.score_weight is not None:
            dev, dt = self.loaded.device, self.loaded.dtype
            bias = adapter.score_bias.to(dev, dt) if adapter.score_bias is not None else None
            self.runner.score_heads[salt] = (adapter.score_weight.to(dev, dt), bias)
        return adapter, card

    def remove_adapter(self, name: str) -> None:
        """New requests can no longer name it; requests in flight keep it until they end. KeyError if unknown."""
        salt = self.adapter_salts.pop(name, None)
        if self.lora.remove(name):
            self.runner.score_heads.pop(salt, None)

    def _release_adapter(self, name: str, salt: str | None) -> None:
        self.lora.unpin(name)
        if self.adapter_salts.get(name) != salt:  # removed (or replaced) while this request ran
            try:
                self.lora.get(name)
            except KeyError:
                self.runner.score_heads.pop(salt, None)

    # --- requests ---
    def validate_request(self, prompt_token_ids: list[int], params: SamplingParams, task: str = "generate") -> int:
        """Check a request against the model (no engine state read or changed); returns its
        max_tokens resolved against the context. Raises RequestRejectedError."""
        num_prompt = len(prompt_token_ids)
        if num_prompt == 0:
            raise RequestRejectedError("the prompt is empty", "prompt")
        if any(not 0 <= int(t) < self.vocab_size for t in prompt_token_ids):
            raise RequestRejectedError(f"prompt token ids must be in [0, {self.vocab_size})", "prompt")
        try:
            params.validate(self.vocab_size, self.config.limits)
        except ValueError as e:
            raise RequestRejectedError(str(e), getattr(e, "param", None)) from e
        if task == "classify":
            max_tokens = 0
            if num_prompt > self.max_model_len:
                raise RequestRejectedError(
                    f"the input has {num_prompt} tokens; the model's context is {self.max_model_len}", "input")
        else:
            room = self.max_model_len - num_prompt
            max_tokens = room if params.max_tokens is None else params.max_tokens
            if max_tokens > room or (params.max_tokens is None and room < 1) or room < 0:
                raise RequestRejectedError(
                    f"the prompt has {num_prompt} tokens and max_tokens is {max_tokens}: more than the model's "
                    f"context of {self.max_model_len} tokens", "max_tokens")
        # 4: a request the whole pool cannot hold would wait forever
        num_blocks_needed = -(-(num_prompt + max_tokens) // self.pool.block_size)
        if num_blocks_needed > self.pool.num_blocks:
            raise RequestRejectedError(
                f"the request needs {num_blocks_needed} KV blocks and the cache has {self.pool.num_blocks} "
                "(raise --kv-cache-memory-mb)", "max_tokens")
        return max_tokens

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    adapter: str | None = None, priority: int = 0, task: str = "generate",
                    admitted: bool = False) -> None:
        """Validate and queue a request; raises RequestRejectedError or QueueFullError, changing nothing.
        admitted: the caller already checked the waiting-queue bounds (AsyncEngine does, on its thread)."""
        if request_id in self.groups:
            raise RequestRejectedError(f"request id {request_id!r} is already in use", "request_id")
        max_tokens = self.validate_request(prompt_token_ids, params, task)
        if adapter is not None and adapter not in self.lora:
            raise KeyError(adapter)
        n = 1 if task == "classify" else params.n
        if not admitted:
            self.scheduler.check_admission(n, n * len(prompt_token_ids))
        if adapter is not None:
            self.lora.pin(adapter)  # kept until the request ends, even if removed meanwhile

        seqs = []
        now = time.monotonic()
        for i in range(n):
            seq = Sequence(seq_id=f"{request_id}#{i}", group_id=request_id, index=i,
                           prompt_token_ids=list(prompt_token_ids), params=params, max_tokens=max_tokens,
                           priority=priority, adapter=adapter, task=task, arrival_time=now,
                           cache_salt=self.adapter_salts.get(adapter) if adapter else None)
            if params.seed is not None and not params.is_greedy:
                seq.generator = torch.Generator().manual_seed((params.seed + i) % 2**64)
            seqs.append(seq)
        stops = StopStrings(params.stop) if params.stop and task == "generate" else None
        detoks = [IncrementalDetokenizer(self.tokenizer, stops, params.include_stop_str_in_output,
                                         params.skip_special_tokens) if task == "generate" else None for _ in seqs]
        self.groups[request_id] = _Group(
            request_id, seqs, detoks, [[] for _ in seqs], [[] for _ in seqs],
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None)
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

    # --- the step ---
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        try:
            result = self.runner.execute(sched, self.lora_hook(sched))
        except Exception as e:  # noqa: BLE001 (one bad batch must not stop the server)
            return self._fail_batch(sched, e)
        self.step_samples.append((len(sched.scheduled), sched.num_batched_tokens))
        return self.update(sched, result)

    def lora_hook(self, sched: SchedulerOutput):
        """The step's LoRA hook: each sequence's adapter in a device slot, None when no row uses one."""
        names = [item.seq.adapter for item in sched.scheduled]
        if all(name is None for name in names):
            return None
        slots = self.lora.acquire(names)
        mapping = LoRAMapping.from_seq_slots(slots, [item.num_new_tokens for item in sched.scheduled],
                                             self.loaded.device)
        return self.lora.step_hook(mapping, self.ops.add_lora)

    def update(self, sched: SchedulerOutput, result: ModelRunnerOutput) -> list[RequestOutput]:
        now = time.monotonic()
        touched: dict[str, _Group] = {}
        for i, item in enumerate(sched.scheduled):
            seq = item.seq
            start = seq.num_computed_tokens
            seq.num_computed_tokens += item.num_new_tokens
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
                elif seq.max_tokens == 0 and seq.num_computed_tokens >= seq.num_tokens:
                    self.scheduler.finish(seq, "length")  # prompt only (echo + logprobs scoring)
                elif i in result.sampled:
                    token_id, logprob = result.sampled[i]
                    self._append_token(group, seq, token_id, logprob, now)
            except Exception as e:  # noqa: BLE001 (fails this request alone)
                log.warning("request %s failed: %s", group.request_id, e)
                self._fail_group(group, e)
        return [self._collect(g) for g in touched.values()]

    def _fail_group(self, group: _Group, error: Exception) -> None:
        group.error = f"{type(error).__name__}: {error}"
        for seq in group.seqs:
            self.scheduler.kv.forget(seq)
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
        if num_out >= params.min_tokens:
            if token_id == self.eos_token_id and not params.ignore_eos:
                return self.scheduler.finish(seq, "stop", None)
            if token_id in params.stop_token_ids:
                return self.scheduler.finish(seq, "stop", token_id)
        stop = group.detoks[seq.index].add_token(token_id, check_stop=num_out >= params.min_tokens)
        if stop is not None:
            return self.scheduler.finish(seq, "stop", stop)
        if num_out >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            self.scheduler.finish(seq, "length")

    def _collect(self, group: _Group) -> RequestOutput:
        """The group's RequestOutput event with everything not yet reported."""
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
        finished = group.finished
        deltas = []
        for seq, text in zip(group.seqs, texts, strict=True):
            tokens = group.pending_tokens[seq.index]
            if tokens or text or seq.is_finished:
                logprobs = group.pending_logprobs[seq.index] if seq.params.logprobs is not None else None
                deltas.append(CompletionDelta(seq.index, text, tokens, logprobs,
                                              seq.finish_reason, seq.stop_reason))
                group.pending_tokens[seq.index] = []
                group.pending_logprobs[seq.index] = []
        first = group.seqs[0]
        out = RequestOutput(
            request_id=group.request_id, outputs=deltas, finished=finished,
            num_prompt_tokens=first.num_prompt_tokens,
            num_generated_tokens=sum(s.num_output_tokens for s in group.seqs),
            num_cached_tokens=first.num_cached_tokens,
            scores=group.scores, error=group.error, arrival_time=first.arrival_time,
            first_scheduled_time=first.first_scheduled_time,
            first_token_time=min((s.first_token_time for s in group.seqs if s.first_token_time), default=None))
        if group.prompt_logprobs is not None and not group.sent_prompt_logprobs and (
                first.num_computed_tokens >= first.num_prompt_tokens or finished):
            out.prompt_logprobs = list(group.prompt_logprobs)
            group.sent_prompt_logprobs = True
        if finished:
            del self.groups[group.request_id]
            if first.adapter is not None:
                self._release_adapter(first.adapter, first.cache_salt)
        return out

    def _fail_batch(self, sched: SchedulerOutput, error: Exception) -> list[RequestOutput]:
        """A forward that raised: fail its requests alone, keep serving the rest."""
        log.exception("engine step failed; failing the %d requests of this batch", len(sched.scheduled))
        groups = {item.seq.group_id: self.groups[item.seq.group_id] for item in sched.scheduled}
        for group in groups.values():
            self._fail_group(group, error)
        return [self._collect(g) for g in groups.values()]

    def stats(self) -> EngineStats:
        """Counters now, and the step samples since the last call (safe to call from another thread)."""
        samples = []
        while self.step_samples:
            samples.append(self.step_samples.popleft())
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=self.scheduler.num_waiting,
            num_waiting_tokens=self.scheduler.num_waiting_tokens, num_kv_blocks_total=self.pool.num_blocks,
            num_kv_blocks_used=self.pool.num_used_blocks, prefix_cache_queries=self.pool.num_queries,
            prefix_cache_hits=self.pool.num_hits, num_preemptions=self.scheduler.num_preemptions,
            step_samples=samples)
