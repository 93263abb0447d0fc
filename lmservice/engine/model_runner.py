"""Runs one scheduled step: flattens the batch, one forward, heads on the rows that need them, sampling.

The forward is one of three paths: a decode fast path (fast_path.py: CUDA graphs on a GPU, the whole step in
C on a CPU), chosen once here, for the steps it accepts; else the op-by-op forward of the model through the
kernel set (KernelOps), whose linears run C only as the CPU-kernel policy says.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lmservice.engine.adapters import AdapterTable
from lmservice.engine.cuda_graphs import DecodeGraphs
from lmservice.engine.fast_path import DecodeFastPath, StepBatch
from lmservice.engine.grammar import GrammarMasks
from lmservice.engine.kv_cache_tensors import KVCacheTensors
from lmservice.engine.native_decode import NativeDecoder
from lmservice.engine.outputs import TokenLogprob
from lmservice.engine.request import Sequence
from lmservice.engine.sampler import Sampler, SamplingBatch
from lmservice.engine.scheduler import SchedulerOutput
from lmservice.engine.speculative import accept
from lmservice.kernels import TORCH_CPU_KERNELS, CpuKernels, KernelOps
from lmservice.model.gpt2 import AttentionMetadata, GPT2ForServing, LoRAHook

log = logging.getLogger(__name__)


@dataclass
class ModelRunnerOutput:
    """Per scheduled sequence (by position in SchedulerOutput.scheduled)."""

    sampled: dict[int, tuple[int, TokenLogprob | None]] = field(default_factory=dict)
    # a speculating sequence's tokens: its accepted guesses and the model's token after them
    emitted: dict[int, list[tuple[int, TokenLogprob | None]]] = field(default_factory=dict)
    scores: dict[int, list[float]] = field(default_factory=dict)
    embeddings: dict[int, list[float]] = field(default_factory=dict)
    prompt_logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)  # a row that failed alone (e.g. NaN logits)


class ModelRunner:
    """Owns the model, its KV cache tensors, the decode fast path and the sampler. The CPU-kernel policy is
    handed to the model's layers here."""

    def __init__(self, *, model: GPT2ForServing, ops: KernelOps, num_blocks: int, block_size: int,
                 device: torch.device, dtype: torch.dtype, eos_token_id: int | None, seed: int = 0,
                 cuda_graph_max_batch: int = 0, adapters: AdapterTable,
                 cpu_kernels: CpuKernels = TORCH_CPU_KERNELS, kv_cache_dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.ops = ops
        model.use_cpu_kernels(cpu_kernels)
        self.device = device
        self.block_size = block_size
        self.eos_token_id = eos_token_id
        c = model.config
        # one allocation for all layers, in the --kv-cache-dtype format (default: the engine passes auto's choice)
        self.kv_cache = KVCacheTensors.allocate(c, num_blocks, block_size, kv_cache_dtype or dtype, device)
        self.kv_caches = self.kv_cache.layers  # layer i's K and V (and int8 scales): views
        self.sampler = Sampler(c.vocab_size, seed)
        self.grammar_masks = GrammarMasks(c.vocab_size)
        self.fast_path: DecodeFastPath | None = None
        if cuda_graph_max_batch > 0 and device.type == "cuda":
            max_blocks = -(-c.n_positions // block_size)
            self.fast_path = DecodeGraphs(model, ops, self.kv_caches, cuda_graph_max_batch, max_blocks, device)
        else:
            self.fast_path = NativeDecoder.build(model, self.kv_caches, cpu_kernels)
        log.info("decode fast path: %s", self.fast_path.name if self.fast_path else "none (every step op by op)")
        self.adapters = adapters  # the owner of the classification heads (the base's and each adapter's)
        # called with every step's batch after its forward: a draft model keeps its KV cache in step with ours
        self.mirror: Callable[[StepBatch, torch.Tensor], None] | None = None

    def block_table(self, seqs: list[Sequence]) -> torch.Tensor:
        """(S, max_blocks) int32: each sequence's block ids, zero-padded."""
        width = max(len(s.block_ids) for s in seqs)
        rows = [s.block_ids + [0] * (width - len(s.block_ids)) for s in seqs]
        return torch.tensor(rows, dtype=torch.int32)

    @torch.inference_mode()
    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole KV blocks (every layer, K and V, int8 scales too): copy-on-write of a forked beam's
        partly filled block.
        NOTE: all sources are read before any destination is written; a destination named twice keeps the
        last copy (the earlier one's block was freed and taken again in the same step)."""
        last = {dst: src for src, dst in copies}
        dst = torch.tensor(list(last), dtype=torch.long, device=self.device)
        src = torch.tensor(list(last.values()), dtype=torch.long, device=self.device)
        self.kv_cache.copy_blocks(src, dst)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, lora: LoRAHook | None = None) -> ModelRunnerOutput:
        if sched.block_copies:
            self.copy_blocks(sched.block_copies)
        scheduled = sched.scheduled
        seqs = [s.seq for s in scheduled]
        num_new = [s.num_new_tokens for s in scheduled]
        starts = [s.num_computed_tokens for s in seqs]
        nd = sched.num_decodes

        input_ids: list[int] = []
        for item, start in zip(scheduled, starts, strict=True):
            guesses = item.spec_token_ids
            input_ids.extend(item.seq.token_slice(start, start + item.num_new_tokens - len(guesses)))
            input_ids.extend(guesses)
        seq_lens = torch.tensor([s + n for s, n in zip(starts, num_new, strict=True)], dtype=torch.int32)
        q_lens = torch.tensor(num_new, dtype=torch.int64)
        block_tables = self.block_table(seqs)  # (S, max_blocks)

        # positions and slots of every token, computed on tensors
        seq_idx = torch.repeat_interleave(torch.arange(len(seqs)), q_lens)  # (T,)
        cu = torch.zeros(len(seqs) + 1, dtype=torch.int64)
        cu[1:] = q_lens.cumsum(0)
        positions = torch.arange(len(input_ids)) - cu[seq_idx] + torch.tensor(starts)[seq_idx]  # (T,)
        slot_mapping = block_tables[seq_idx, positions // self.block_size].long() * self.block_size \
            + positions % self.block_size

        if sched.num_spec_tokens:
            # a speculating sequence's tokens are decodes of their own: token j attends to positions
            # <= start + j (every K/V of a layer is written before any row attends), so a step of decodes and
            # speculating sequences is a pure decode step for the kernels and the fast paths
            rows = torch.repeat_interleave(torch.arange(nd), q_lens[:nd])  # decode section: a row per token
            seq_lens = torch.cat([(positions[:len(rows)] + 1).to(torch.int32), seq_lens[nd:]])
            row_tables = torch.cat([block_tables[rows], block_tables[nd:]])
            row_cu = torch.cat([torch.arange(len(rows)), cu[nd:]])
            batch = StepBatch(input_ids, positions, slot_mapping, seq_lens, row_tables, len(rows), lora)
        else:
            row_cu = cu
            batch = StepBatch(input_ids, positions, slot_mapping, seq_lens, block_tables, nd, lora)
        hidden = self.forward(batch, row_cu)
        if self.mirror is not None:
            self.mirror(batch, row_cu)
        return self._heads(hidden, seqs, starts, num_new, cu, [s.spec_token_ids for s in scheduled])

    def forward(self, batch: StepBatch, cu: torch.Tensor) -> torch.Tensor:
        """The final hidden states (T, C) of a step's tokens, their K/V written: the fast path where it
        takes the batch, else op by op. `cu`: cumulative token counts per sequence (S + 1,)."""
        if self.fast_path is not None and self.fast_path.can_run(batch):
            return self.fast_path.run(batch)
        return self._forward_eager(batch, cu)

    def _forward_eager(self, batch: StepBatch, cu: torch.Tensor) -> torch.Tensor:
        dev, nd = self.device, batch.num_decodes
        seq_lens, block_tables = batch.seq_lens, batch.block_tables
        prefill_cu = (cu[nd:] - cu[nd]).to(torch.int32)
        decode_seq_lens, decode_block_tables = seq_lens[:nd].to(dev), block_tables[:nd].to(dev)
        meta = AttentionMetadata(
            slot_mapping=batch.slot_mapping.to(dev),
            num_decode_tokens=nd,
            decode_seq_lens=decode_seq_lens,
            decode_block_tables=decode_block_tables,
            prefill_cu_seqlens_q=prefill_cu.to(dev),
            prefill_seq_lens=seq_lens[nd:].to(dev),
            prefill_block_tables=block_tables[nd:].to(dev),
            decode_plan=self.ops.plan_decode(decode_seq_lens, decode_block_tables, self.block_size) if nd else None,
        )
        return self.model(torch.tensor(batch.input_ids, device=dev), batch.positions.to(dev), meta, self.kv_caches,
                          self.ops, batch.lora)  # (T, C)

    def _heads(self, hidden: torch.Tensor, seqs: list[Sequence], starts: list[int], num_new: list[int],
               cu: torch.Tensor, guesses: list[list[int]]) -> ModelRunnerOutput:
        """Prompt logprobs, classification scores and sampling, on the rows that need them."""
        out = ModelRunnerOutput()
        last_row = (cu[1:] - 1).tolist()
        sample_idx, classify_idx = [], []
        for i, (seq, start, n) in enumerate(zip(seqs, starts, num_new, strict=True)):
            if seq.params.prompt_logprobs is not None and start < seq.num_prompt_tokens:
                out.prompt_logprobs[i] = self._prompt_logprobs(hidden[cu[i]:cu[i + 1]], seq, start)
            if seq.task == "embed":
                self._pool(hidden[cu[i]:cu[i + 1]], seq, start, n, i, out)
            elif start + n - len(guesses[i]) == seq.num_tokens:
                if seq.task == "classify":
                    classify_idx.append(i)
                elif seq.max_tokens > 0:
                    sample_idx.append(i)
        if classify_idx:
            self._classify(hidden, [last_row[i] for i in classify_idx], [seqs[i] for i in classify_idx],
                           classify_idx, out)
        if sample_idx:
            self._sample(hidden, seqs, sample_idx, last_row, guesses, out)
        return out

    def _sample(self, hidden: torch.Tensor, seqs: list[Sequence], sample_idx: list[int], last_row: list[int],
                guesses: list[list[int]], out: ModelRunnerOutput) -> None:
        """One sampling pass over the rows that produce tokens. A speculating sequence has a row per position
        of its guesses and one after them, each sampled as if the guesses before it had been generated (its
        history, and a seeded sequence's next draws, in position order); it emits the guesses up to the
        first the model disagrees with, then the model's token there (speculative.accept)."""
        owner, rows, history = [], [], []  # per sampling row: its sequence's index, hidden row, extra history
        for i in sample_idx:
            k = len(guesses[i])
            for j in range(k + 1):
                owner.append(i)
                rows.append(last_row[i] - k + j)
                history.append(guesses[i][:j])
        logits = self.model.compute_logits(hidden[rows])  # (R, V)
        finite = torch.isfinite(logits).all(dim=-1)
        row_errors: dict[int, str] = {}  # NOTE: by row: a position past a rejected guess fails nobody
        if not bool(finite.all()):
            for row in (~finite).nonzero().flatten().tolist():
                row_errors[row] = "the model produced non-finite logits"
            logits = torch.where(finite[:, None], logits, torch.zeros_like(logits))
        speculating = [i for i in sample_idx if guesses[i]]
        states = {i: seqs[i].generator.get_state() for i in speculating if seqs[i].generator is not None}
        batch = SamplingBatch(
            params=[seqs[i].params for i in owner],
            generators=[seqs[i].generator for i in owner],
            output_token_ids=[seqs[i].output_token_ids + extra if extra else seqs[i].output_token_ids
                              for i, extra in zip(owner, history, strict=True)],
            prompt_token_ids=[seqs[i].prompt_token_ids for i in owner],
            eos_token_id=self.eos_token_id,
            bitmask=self.grammar_masks.fill([seqs[i].grammar for i in owner]),
            masks=self.grammar_masks,
        )
        sampled = self.sampler(logits, batch)
        for row, message in sampled.errors.items():
            row_errors.setdefault(row, message)
        tokens: dict[int, list[tuple[int, TokenLogprob | None, str | None]]] = {}
        for row, i in enumerate(owner):
            lp = None
            if sampled.logprobs is not None and seqs[i].params.logprobs is not None:
                lp = TokenLogprob(sampled.token_ids[row], sampled.logprobs[row], sampled.top_logprobs[row])
            tokens.setdefault(i, []).append((sampled.token_ids[row], lp, row_errors.get(row)))
        for i in sample_idx:
            if not guesses[i]:
                token_id, lp, error = tokens[i][0]
                if error is not None:
                    out.errors[i] = error
                else:
                    out.sampled[i] = (token_id, lp)
                continue
            emitted = accept(guesses[i], [t for t, _, _ in tokens[i]])
            error = next((e for _, _, e in tokens[i][:len(emitted)] if e is not None), None)
            if error is not None:  # a position the sequence would emit failed: the request fails
                out.errors[i] = error
                continue
            out.emitted[i] = [(t, lp) for t, lp, _ in tokens[i][:len(emitted)]]
            if i in states:  # draws of the positions not emitted are given back
                self.sampler.rewind(seqs[i].generator, states[i], len(emitted))

    def _pool(self, hidden: torch.Tensor, seq: Sequence, start: int, n: int, i: int, out: ModelRunnerOutput) -> None:
        """Mean pooling across prefill chunks: the chunk's sum joins the sequence's (restarted when the
        sequence restarts from position 0, as after a preemption); the last chunk emits the mean, L2-normalised."""
        chunk = hidden.float().sum(dim=0)  # (C,)
        seq.pooled_sum = chunk if start == 0 or seq.pooled_sum is None else seq.pooled_sum + chunk
        if start + n < seq.num_tokens:
            return
        mean = seq.pooled_sum / seq.num_tokens
        seq.pooled_sum = None
        if not bool(torch.isfinite(mean).all()):
            out.errors[i] = "the model produced non-finite hidden states"
            return
        out.embeddings[i] = F.normalize(mean, dim=0).tolist()

    def _classify(self, hidden: torch.Tensor, rows: list[int], seqs: list[Sequence], idx: list[int],
                  out: ModelRunnerOutput) -> None:
        h = hidden[rows]  # (N, C)
        for row, (i, seq) in enumerate(zip(idx, seqs, strict=True)):
            head = self.adapters.score_head(seq.adapter_key)
            if head is None:
                out.errors[i] = f"model {seq.adapter or 'base'} has no classification head"
                continue
            weight, bias = head
            logits = F.linear(h[row], weight, bias).float()  # (num_labels,)
            if not bool(torch.isfinite(logits).all()):
                out.errors[i] = "the model produced non-finite scores"
                continue
            out.scores[i] = torch.softmax(logits, dim=-1).tolist()

    def _prompt_logprobs(self, hidden: torch.Tensor, seq: Sequence, start: int) -> list[TokenLogprob]:
        """Logprob of each prompt token given the ones before it, for the chunk's positions."""
        end = min(start + hidden.shape[0], seq.num_prompt_tokens - 1)  # position p predicts token p + 1
        if end <= start:
            return []
        logprobs = torch.log_softmax(self.model.compute_logits(hidden[: end - start]).float(), dim=-1)
        targets = torch.tensor(seq.prompt_token_ids[start + 1:end + 1])
        chosen = logprobs.gather(1, targets[:, None].to(logprobs.device)).squeeze(1).tolist()
        k = seq.params.prompt_logprobs
        tops: list[list[tuple[int, float]]] = [[] for _ in chosen]
        if k:
            values, indices = logprobs.topk(k, dim=-1)
            tops = [list(zip(ix, vs, strict=True)) for ix, vs in zip(indices.tolist(), values.tolist(), strict=True)]
        return [TokenLogprob(t, lp, top) for t, lp, top in zip(targets.tolist(), chosen, tops, strict=True)]
