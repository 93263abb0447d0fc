"""Decode steps of a few sequences as one C call on CPUs (lmservice.kernels.cpu_native.NativeDecodeStep).

Op by op, a batch-1 decode step spends much of its time in Python and op dispatch (docs/kernels.md):
twelve layers of a dozen torch ops each, every one a trip through the dispatcher. The C step runs the
whole stack (LayerNorms, projections, KV write, paged attention, GELU, residuals) in one call; only the
embedding lookup before it and the LM head and sampling after it stay in torch. It is one of the decode
fast paths (fast_path.py): pure decode steps without LoRA, up to the CPU-kernel policy's
`decode_step_rows` sequences (`decode_step_int8_rows` for a per-channel int8 model); larger decode batches go op
by op, to oneDNN, FBGEMM or the C block kernel.

Built where the policy runs C and the model exports weights the step computes the same way
(GPT2ForServing.decode_step_weights: tanh GELU, fp32 or bf16 projections, or int8 ones where the library has an
int8 kernel). `build` returns None otherwise. A bf16 model's step computes in fp32 with its bf16 weights widened
as they are read, and hands fp32 hidden states to the LM head: more precise than its op-by-op steps, whose
activations are bf16, so its tokens can differ from theirs where two logits nearly tie.
"""

from __future__ import annotations

import torch

from lmservice.engine.fast_path import StepBatch
from lmservice.kernels import CpuKernels
from lmservice.kernels.cpu_native import NativeDecodeStep
from lmservice.model.gpt2 import GPT2ForServing


class NativeDecoder:
    name = "C step"

    def __init__(self, model: GPT2ForServing, step: NativeDecodeStep, max_rows: int) -> None:
        self.model, self.step, self.max_rows = model, step, max_rows

    @classmethod
    def build(cls, model: GPT2ForServing, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
              kernels: CpuKernels) -> NativeDecoder | None:
        library = kernels.library
        if library is None:
            return None
        weights = model.decode_step_weights(kv_caches)
        if weights is None:
            return None
        # per-channel int8 has FBGEMM op by op, which beats the C kernel past a few rows on AVX2; fp32 and block
        # weights (int4) run the same C linears op by op, so the one-call step is the faster up to its limit
        max_rows = kernels.decode_step_int8_rows if weights.has_channel_int8 else kernels.decode_step_rows
        if max_rows == 0 or (weights.is_int8 and not library.has_int8):
            return None
        return cls(model, NativeDecodeStep(library, weights), max_rows)

    def can_run(self, batch: StepBatch) -> bool:
        return batch.is_plain_decode and 1 <= batch.num_decodes <= self.max_rows

    def run(self, batch: StepBatch) -> torch.Tensor:
        # (rows, C) fp32, a fresh tensor the step overwrites (a bf16 model's embeddings widened before the sum)
        h = self.model.embed(batch.input_ids, batch.positions, torch.float32)
        return self.step(h, batch.slot_mapping, batch.seq_lens, batch.block_tables)
