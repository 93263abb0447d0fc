"""8- and 4-bit weights for the loaded model (`--quantization int8 | int4`), applied after loading by swapping
modules.

Every projection (c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj) and the LM head becomes an `Int8Linear`:
the weight stored as int8 with one fp32 scale per output channel (symmetric, scale = max|w| / 127),
and each call quantizing its input dynamically (per tensor, uint8) before an int8 x int8 GEMM with
int32 accumulation: torch's x86 quantized engine (FBGEMM / oneDNN, VNNI or AMX where the CPU has them).
At decode batch sizes the step is bound by reading weights, and int8 reads a quarter of them: faster
than fp32, and than weight-only int8 with bf16 activations (`python benchmarks/linear.py`, docs/benchmarks.md).
Calls of at most the CPU-kernel policy's `linear_int8_rows` rows (decode steps) take our own C kernel
instead where it is faster than FBGEMM, on AVX-512 VNNI (lmservice/kernels/cpu_native.py
NativeLibrary.linear_int8: packed weights, each input row quantized with its own scale; docs/kernels.md);
prefills stay on FBGEMM. (On AVX2 the same kernel runs inside the C decode step only: cpu_policy.py.) Until the
policy is handed over (use_cpu_kernels) every call is FBGEMM's.

`--quantization int4` makes every projection a `BlockLinear` of 4 bits: blocks of 32 inputs per channel, each
with an fp16 scale (llama.cpp's q4_0 layout), and the input quantized to int8 in blocks of 32 as well; the LM
head, which is the tied embedding and shapes every logit, stays a per-channel Int8Linear. The C block kernel
takes every call where the library has an int8 kernel (AVX2 or AVX-512 VNNI), prefills too; elsewhere the
dequantized torch path, which is also its reference. The same module with 8 bits is q8_0's layout
(benchmarks/quantization.py int8-blocks).

Embeddings, LayerNorms, the KV cache and classification score heads stay in fp32; LoRA adapters add
their fp32 delta to the quantized projection's output, unchanged. The scheduler never sees any of it.

The reference for the kernel is `Int8Linear.reference`: the same quantized weights and the same
quantized input, dequantized and multiplied in fp32 (tests/model/test_quantize.py).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from lmservice.kernels import TORCH_CPU_KERNELS, CpuKernels
from lmservice.kernels.cpu_native import (
    QBLOCK,
    LinearWeights,
    dequantize_blocks,
    pack_block_weight,
    pack_int8_weight,
    quantize_blocks,
    unpack_block_weight,
    unpack_int8_weight,
)
from lmservice.model.cpu import cpu_flags

QUANTIZATIONS = ("none", "int8", "int4")


def _quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """x as the C kernels quantize it, dequantized: per row, symmetric int8, scale max |x| / 127."""
    top = x.abs().amax(dim=-1, keepdim=True)
    scale = (top / 127.0).masked_fill_(top == 0, 1.0)
    return torch.round(x / scale) * scale


def _quantize_blocks_of_x(x: torch.Tensor) -> torch.Tensor:
    """x as the block kernels quantize it, dequantized: _quantize_rows on each block of QBLOCK inputs."""
    n = x.shape[-1]
    padded = F.pad(x, (0, -n % QBLOCK))
    return _quantize_rows(padded.reshape(*x.shape[:-1], -1, QBLOCK)).reshape(padded.shape)[..., :n]


class Int8Linear(nn.Module):
    """y = x @ dequant(W).T + b with W int8 per output channel; x quantized per call (see module docstring)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernels: CpuKernels = TORCH_CPU_KERNELS) -> None:
        super().__init__()
        weight = weight.detach().float()
        self.out_features, self.in_features = weight.shape
        scales = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # (out,)
        with warnings.catch_warnings():  # NOTE: torch marks quantized tensors deprecated (torchao is their
            warnings.simplefilter("ignore", UserWarning)  # successor); the pinned torch 2.13 has them
            qweight = torch.quantize_per_channel(weight, scales.double(), torch.zeros_like(scales, dtype=torch.long),
                                                 axis=0, dtype=torch.qint8)
        weight_int8 = qweight.int_repr()  # (out, in)
        # for the native kernel (lmservice/kernels/cpu_native.py pack_int8_weight); FBGEMM packs its own copy below
        self.register_buffer("weight_packed", pack_int8_weight(weight_int8), persistent=False)
        self.register_buffer("scales", scales, persistent=False)  # (out,) fp32
        self.register_buffer("weight_sums", weight_int8.sum(dim=1, dtype=torch.int32), persistent=False)
        self.bias = None if bias is None else bias.detach().float()
        self._packed = torch.ops.quantized.linear_prepack(qweight, self.bias)
        self._packed_no_bias = torch.ops.quantized.linear_prepack(qweight, None) if bias is not None else self._packed
        # NOTE: with 8-bit activations the non-VNNI AVX2 kernel sums pairs of u8 x s8 products in int16,
        # which can saturate; 7-bit activations (reduce_range) avoid that. VNNI / AMX accumulate in int32.
        self.reduce_range = not ({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags())
        self.use_cpu_kernels(kernels)

    def use_cpu_kernels(self, kernels: CpuKernels) -> None:
        """Calls of at most kernels.linear_int8_rows rows go to the native int8 kernel (per-row activation
        scales); the rest (prefills) to FBGEMM."""
        self.kernels = kernels
        self.native_rows = kernels.linear_int8_rows

    def native_weights(self) -> LinearWeights:
        """The packed weights as the C decode step reads them."""
        return LinearWeights(self.weight_packed, self.bias, self.scales, self.weight_sums, self.in_features)

    @property
    def weight_int8(self) -> torch.Tensor:
        """The (out, in) int8 weight (unpacked on each read: for references and tests)."""
        return unpack_int8_weight(self.weight_packed, self.out_features, self.in_features)

    def forward(self, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        if x.numel() <= self.native_rows * self.in_features:
            return self.kernels.library.linear_int8(x.float(), self.weight_packed, self.weight_sums, self.scales,
                                                    self.bias if with_bias else None)
        packed = self._packed if with_bias else self._packed_no_bias
        shape = x.shape
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, shape[-1]).float(), packed, self.reduce_range)
        return y.reshape(*shape[:-1], self.out_features)

    def reference(self, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        """The kernel's own dequantized path: x quantized as the kernel that takes it does, then dequantized
        weights and input multiplied in fp32. FBGEMM: per tensor, affine uint8 over [min(x, 0), max(x, 0)];
        the native kernel (at most native_rows rows): per row, symmetric int8, scale max |x| / 127."""
        w_deq = self.weight_int8.float() * self.scales[:, None]
        bias = self.bias if with_bias else None
        if x.numel() <= self.native_rows * self.in_features:
            return F.linear(_quantize_rows(x), w_deq, bias)
        levels = 127 if self.reduce_range else 255
        low, high = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
        scale = max((high - low) / levels, 1e-12)
        zero_point = min(max(round(-low / scale), 0), levels)
        xq = torch.clamp(torch.round(x / scale) + zero_point, 0, levels)
        x_deq = (xq - zero_point) * scale
        return F.linear(x_deq, w_deq, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class BlockLinear(nn.Module):
    """y = x @ dequant(W).T + b with W in blocks of 32 inputs per channel, each block with its own fp16 scale, 8 or
    4 bits (lmservice/kernels/cpu_native.py quantize_blocks: q8_0- and q4_0-like); x quantized to int8 in blocks
    of 32 as well (as llama.cpp quantizes activations for q8_0 and q4_0 dots), as the C kernel does. Where the CPU-kernel policy gives it rows (a library with an int8 kernel: AVX2 or AVX-512 VNNI)
    every call is the C kernel (NativeLibrary.linear_block, weights unpacked in registers); otherwise `reference`,
    the dequantized torch path, which is also what the kernel is tested against."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, bits: int,
                 kernels: CpuKernels = TORCH_CPU_KERNELS) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.bits = bits
        packed, scales = pack_block_weight(*quantize_blocks(weight.detach().float(), bits), bits)
        self.register_buffer("weight_packed", packed, persistent=False)  # (tiles, blocks, 16 * 32 * bits / 8) uint8
        self.register_buffer("block_scales", scales, persistent=False)  # (tiles, blocks, 16) fp16
        self.bias = None if bias is None else bias.detach().float()
        self.use_cpu_kernels(kernels)

    def use_cpu_kernels(self, kernels: CpuKernels) -> None:
        self.kernels = kernels
        self.native_rows = kernels.linear_block_rows

    def native_weights(self) -> LinearWeights:
        return LinearWeights(self.weight_packed, self.bias, self.block_scales, None, self.in_features, self.bits,
                             self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The (out, in) fp32 weight the blocks stand for."""
        return dequantize_blocks(*unpack_block_weight(self.weight_packed, self.block_scales, self.bits,
                                                      self.out_features, self.in_features))

    def forward(self, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        if x.numel() <= self.native_rows * self.in_features:
            return self.kernels.library.linear_block(x.float(), self.weight_packed, self.block_scales, self.bits,
                                                     self.out_features, self.bias if with_bias else None)
        return self.reference(x, with_bias)

    def reference(self, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        return F.linear(_quantize_blocks_of_x(x.float()), self.dequantized_weight(), self.bias if with_bias else None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.bits}-bit blocks of 32"


def quantize_int4(model: nn.Module) -> int:
    """Every projection of a GPT2ForServing to 4-bit blocks (BlockLinear), and the LM head (the tied embedding,
    whose precision every token's logits read) to per-channel int8; returns how many were swapped."""
    lm_head = model.lm_head
    swapped = model.swap_linears(lambda linear: linear if linear is lm_head else BlockLinear(linear.weight, linear.bias, 4))
    model.lm_head = Int8Linear(lm_head.weight, lm_head.bias)
    return swapped


def quantize_int8(model: nn.Module) -> int:
    """Swap every projection and the LM head of a GPT2ForServing for Int8Linear; returns how many.
    CPU only: torch's quantized GEMMs have no CUDA kernels."""
    return model.swap_linears(lambda linear: Int8Linear(linear.weight, linear.bias))
