"""The draft-model proposer of speculative decoding: a small GPT-2 with the base's tokenizer guesses greedily.

The draft keeps a KV cache of its own with the same blocks as the base's: block i of the draft's cache holds
the draft's K/V for the tokens of the base's block i. So it needs no bookkeeping of its own (prefix caching,
preemption, n > 1, chunked prefill and beam search's block copies need nothing more) as long as it sees every
token the base computes and every block copy: its runner is the base runner's `mirror`, run on every step's
batch after the base's forward (at a cost in proportion to the draft's size, also in steps too large to guess
in), and `fill` makes the step's block copies in the draft's cache.

Guessing happens after scheduling, once the scheduler has given each speculating sequence the slots of its
guesses: k greedy decode steps of the draft over those sequences (argmax of its raw logits: a deterministic
proposal, as speculative.py's verification expects), each writing the draft's K/V at the next slot. Rows with
a LoRA adapter get n-gram guesses instead: the draft has no adapter, so its guesses would mostly be rejected.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from lmservice.engine.fast_path import StepBatch
from lmservice.engine.model_runner import ModelRunner
from lmservice.engine.request import Sequence
from lmservice.engine.scheduler import SchedulerOutput
from lmservice.engine.speculative import NgramProposer, SpeculativeConfig
from lmservice.kernels import choose_kernels
from lmservice.model.loader import LoadedModel, load_model

log = logging.getLogger("lmservice.engine")

PLACEHOLDER = -1  # a guess the draft has yet to make (the scheduler only counts them)


class DraftProposer:
    def __init__(self, config: SpeculativeConfig, draft: LoadedModel, runner: ModelRunner) -> None:
        self.config = config
        self.draft = draft
        self.runner = runner
        self.block_size = runner.block_size
        self.ngram = NgramProposer(config)

    @classmethod
    def load(cls, config: SpeculativeConfig, base: LoadedModel, engine) -> DraftProposer:
        """Load the draft beside `base` (same device and dtype) and hook it into the engine's runner.
        ValueError naming the mismatch when it cannot draft for this base."""
        draft = load_model(config.draft_model, device=base.device.type, dtype=str(base.dtype).removeprefix("torch."))
        if draft.tokenizer.backend_tokenizer.get_vocab() != base.tokenizer.backend_tokenizer.get_vocab():
            raise ValueError(f"draft model {config.draft_model}: its tokenizer is not the base model's")
        if draft.config.vocab_size != base.config.vocab_size:
            raise ValueError(f"draft model {config.draft_model}: vocab_size {draft.config.vocab_size}, "
                             f"the base's is {base.config.vocab_size}")
        if draft.config.n_positions < base.config.n_positions:
            raise ValueError(f"draft model {config.draft_model}: n_positions {draft.config.n_positions} is shorter "
                             f"than the base's {base.config.n_positions}")
        ec = engine.config
        ops, cpu_kernels = choose_kernels(ec.attention_backend, ec.cpu_kernels, draft.device, draft.dtype)
        runner = ModelRunner(model=draft.model, ops=ops, num_blocks=engine.pool.num_blocks, block_size=ec.block_size,
                             device=draft.device, dtype=draft.dtype, eos_token_id=engine.eos_token_id,
                             adapters=engine.adapters, cpu_kernels=cpu_kernels,
                             kv_cache_dtype=engine.runner.kv_cache.buffer.dtype)  # the base's --kv-cache-dtype
        mib = runner.kv_cache.describe()["bytes"] / 2**20
        log.info("draft model %s: %d layers, %d wide; its KV cache %.0f MiB", config.draft_model,
                 draft.config.n_layer, draft.config.n_embd, mib)
        proposer = cls(config, draft, runner)
        engine.runner.mirror = proposer.mirror
        return proposer

    def propose(self, seqs: list[Sequence], budget: list[int]) -> list[list[int]]:
        """Adapter rows: n-gram guesses now. Others: placeholders, guessed by `fill` once slots exist."""
        out = []
        for seq, k in zip(seqs, budget, strict=True):
            if seq.adapter is not None:
                out.extend(self.ngram.propose([seq], [k]))
            else:
                out.append([PLACEHOLDER] * max(0, k))
        return out

    def mirror(self, batch: StepBatch, cu: torch.Tensor) -> None:
        """The draft's forward over the base's step (its K/V written into the same slots), no adapter."""
        self.runner.forward(replace(batch, lora=None), cu)

    @torch.inference_mode()
    def fill(self, sched: SchedulerOutput) -> None:
        """Replace the placeholders of the scheduled rows by the draft's greedy guesses. First the step's
        block copies (a forked beam's copy-on-write), made in the draft's cache as the base runner makes
        them in its own, so that the draft's blocks keep mirroring the base's."""
        if sched.block_copies:
            self.runner.copy_blocks(sched.block_copies)
        items = [it for it in sched.scheduled if it.spec_token_ids and it.spec_token_ids[0] == PLACEHOLDER]
        if not items:
            return
        bs = self.block_size
        tokens = [it.seq.token_slice(it.seq.num_tokens - 1, it.seq.num_tokens)[0] for it in items]
        for step in range(max(len(it.spec_token_ids) for it in items)):
            rows = [r for r, it in enumerate(items) if step < len(it.spec_token_ids)]
            seqs = [items[r].seq for r in rows]
            positions = torch.tensor([s.num_tokens - 1 + step for s in seqs], dtype=torch.int64)
            block_tables = self.runner.block_table(seqs)
            slots = block_tables[torch.arange(len(rows)), positions // bs].long() * bs + positions % bs
            batch = StepBatch([tokens[r] for r in rows], positions, slots, (positions + 1).to(torch.int32),
                              block_tables, len(rows), None)
            hidden = self.runner.forward(batch, torch.arange(len(rows) + 1))
            guesses = self.draft.model.compute_logits(hidden).argmax(dim=-1).tolist()
            for r, g in zip(rows, guesses, strict=True):
                items[r].spec_token_ids[step] = g
                tokens[r] = g
