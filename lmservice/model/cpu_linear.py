"""fp32 projections on oneDNN instead of torch's BLAS (`--linear-backend`), applied after loading by swapping modules.

`auto` picks oneDNN for fp32 on x86 CPUs. MKL (torch's BLAS there) takes its fast paths only on Intel CPUs: on
an AMD EPYC the decode step's projections and LM head ran 1.5-2.8x faster through oneDNN. On an Intel Xeon with
AMX oneDNN was faster too, 1.1-1.3x on the 48 projections from 5 to 128 rows and 2x on the LM head at 8-12 rows
(docs/benchmarks.md). bf16 and fp16 already go to oneDNN inside F.linear; int8 has its own modules (quantize.py).

The swapped module holds the same weight and bias tensors (a tied LM head stays tied), so state_dict
names, LoRA hooks and the Triton path's fused bias are untouched.
"""

from __future__ import annotations

import platform

import torch
from torch import nn

from lmservice.kernels import TORCH_CPU_KERNELS, CpuKernels
from lmservice.kernels.linear import linear_onednn, onednn_available

LINEAR_BACKENDS = ("auto", "torch", "onednn")


class OneDNNLinear(nn.Module):
    """nn.Linear's forward through lmservice.kernels.linear.linear_onednn; same parameters, same results (fp32 rounding aside).

    Calls of at most the CPU-kernel policy's `linear_f32_rows` rows (decode steps of a few sequences) go to
    the native C linear, which streams each weight row once for all rows, faster than oneDNN's small-M GEMM
    there (docs/kernels.md). Until the policy is handed over (use_cpu_kernels) every call is oneDNN's.
    """

    def __init__(self, linear: nn.Linear, kernels: CpuKernels = TORCH_CPU_KERNELS) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.use_cpu_kernels(kernels)

    def use_cpu_kernels(self, kernels: CpuKernels) -> None:
        self.kernels = kernels
        self.few_rows = kernels.linear_f32_rows if self.weight.is_contiguous() else 0

    def forward(self, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        bias = self.bias if with_bias else None
        if x.numel() <= self.few_rows * self.in_features:
            return self.kernels.library.linear_f32(x, self.weight, bias)
        return linear_onednn(x, self.weight, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN"


def resolve_linear_backend(backend: str, device: torch.device, dtype: torch.dtype, quantization: str) -> str:
    """What `backend` means for this model: "onednn" or "torch". auto: oneDNN for fp32 on x86."""
    if backend not in LINEAR_BACKENDS:
        raise ValueError(f"linear backend {backend!r} is not one of {', '.join(LINEAR_BACKENDS)}")
    if backend == "torch" or quantization != "none" or device.type != "cpu" or dtype != torch.float32:
        return "torch"
    if not onednn_available():
        if backend == "onednn":
            raise ValueError("--linear-backend onednn: this torch build has no oneDNN (mkldnn)")
        return "torch"
    if backend == "onednn":
        return "onednn"
    return "onednn" if platform.machine().lower() in ("x86_64", "amd64") else "torch"


def use_onednn(model: nn.Module) -> int:
    """Swap every projection and the LM head of a GPT2ForServing for OneDNNLinear; returns how many."""
    return model.swap_linears(OneDNNLinear)
