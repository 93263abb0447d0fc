"""fp32 projections through oneDNN's JIT matmul: the CPU path where torch's BLAS is slow.

torch's CPU `F.linear` on fp32 goes to its BLAS (MKL on x86 builds). MKL picks its fast code paths by CPU
vendor, and on an AMD EPYC it read GPT-2 small's projections at decode row counts well below memory
bandwidth; oneDNN's kernels, chosen by instruction set alone, ran the same calls faster
(docs/benchmarks.md). The reference is `F.linear`.
"""

from __future__ import annotations

import torch


def linear_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight.T + bias; x (..., in), weight (out, in) dense (not prepacked)."""
    # "none": no fused post-op. NOTE: mkldnn::_linear_pointwise is the op inductor emits for CPU linears;
    # it reads the plain (out, in) weight, so the tensor stays shared (tied LM head, LoRA, state_dict).
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
