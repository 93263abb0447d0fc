"""Decode steps of a few sequences as one C call on CPUs (lmservice.kernels.cpu_native.NativeDecodeStep).

At batch 1 an int8 step was ~6 ms of Python and op dispatch around ~6 ms of GEMMs (docs/benchmarks.md):
twelve layers of a dozen torch ops each, every one a trip through the dispatcher. The native step runs
the whole stack (LayerNorms, projections, KV write, paged attention, GELU, residuals) in C; only the
embedding lookup before it and the LM head and sampling after it stay in torch. It is the CPU's
counterpart of the CUDA graphs in cuda_graphs.py, and like them it serves pure decode steps without LoRA;
everything else (prefill, mixed steps, adapters, more than MAX_ROWS sequences) takes the op-by-op path.

Built for attention_backend `native` (fp32 CPU models, fp32 or int8 projections), when every layer is
one the C step computes the same way: tanh GELU, projections that are nn.Linear, OneDNNLinear or
Int8Linear (the latter where the library has its int8 kernel). `build` returns None otherwise.
"""

from __future__ import annotations

import torch
from torch import nn

from lmservice.kernels.cpu_native import LayerWeights, LinearWeights, NativeDecodeStep, int8_kernel_available
from lmservice.model.cpu_linear import OneDNNLinear
from lmservice.model.gpt2 import GPT2ForServing
from lmservice.model.quantize import Int8Linear

_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# The most decode rows a step sends to C. Measured on GPT-2 small, 2 threads, AMD EPYC (Zen 4), engine steps
# interleaved with the op-by-op path (benchmarks/native_step.py, docs/benchmarks.md): C / op-by-op step time
# fp32 0.85 / 0.69 / 0.84 / 0.94 at 1 / 8 / 16 / 32 rows, int8 0.58 / 0.73 / 0.78 / 0.80 (the op-by-op int8
# path itself on the C int8 linear up to 32 rows). Larger decode batches go op by op, to oneDNN and FBGEMM.
MAX_ROWS = 32


def _weights(module: nn.Module) -> LinearWeights | None:
    if isinstance(module, nn.Linear | OneDNNLinear):
        if module.weight.dtype != torch.float32 or not module.weight.is_contiguous():
            return None
        return LinearWeights(module.weight.detach(), None if module.bias is None else module.bias.detach())
    if isinstance(module, Int8Linear) and int8_kernel_available():
        return LinearWeights(module.weight_packed, module.bias, module.scales, module.weight_sums, module.in_features)
    return None


class NativeDecoder:
    def __init__(self, model: GPT2ForServing, step: NativeDecodeStep, max_rows: int) -> None:
        self.model, self.step, self.max_rows = model, step, max_rows

    @classmethod
    def build(cls, model: GPT2ForServing, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> NativeDecoder | None:
        c, t = model.config, model.transformer
        if c.activation_function not in _TANH_GELU or t.wte.weight.dtype != torch.float32:
            return None
        eps = {m.eps for b in t.h for m in (b.ln_1, b.ln_2)} | {t.ln_f.eps}
        if len(eps) != 1:
            return None
        layers = []
        for block, (k_cache, v_cache) in zip(t.h, kv_caches, strict=True):
            linears = [_weights(m) for m in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)]
            if any(lw is None for lw in linears) or k_cache.device.type != "cpu" or k_cache.dtype != torch.float32:
                return None
            layers.append(LayerWeights(
                (block.ln_1.weight.detach(), block.ln_1.bias.detach()), (block.ln_2.weight.detach(), block.ln_2.bias.detach()),
                *linears, k_cache, v_cache, block.attn.scale))
        step = NativeDecodeStep(layers, (t.ln_f.weight.detach(), t.ln_f.bias.detach()), eps.pop(), c.n_head, c.n_inner)
        return cls(model, step, MAX_ROWS)

    def can_run(self, num_decodes: int) -> bool:
        return 1 <= num_decodes <= self.max_rows

    def run(self, input_ids: list[int], positions: torch.Tensor, slot_mapping: torch.Tensor, seq_lens: torch.Tensor,
            block_tables: torch.Tensor) -> torch.Tensor:
        """The final hidden states (rows, n_embd) of a pure decode step, its K/V written to the cache."""
        t = self.model.transformer
        h = t.wte.weight[input_ids] + t.wpe.weight[positions]  # (rows, C), a fresh tensor the step overwrites
        return self.step(h, slot_mapping, seq_lens, block_tables)
