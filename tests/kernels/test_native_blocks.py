"""lmservice/kernels/cpu_native.py's block-quantized weights (8 or 4 bits, 32 inputs per fp16 scale): the packing,
and the C kernel against the dequantized reference, on the library this CPU loads (tests/kernels/test_cpu_isa.py
re-runs them on the AVX2 build)."""

from __future__ import annotations

import pytest
import torch

import lmservice.kernels.cpu_native as native

LIB = native.native_library()
NO_INT8 = pytest.mark.skipif(LIB is None or not LIB.has_int8,
                             reason=f"the {LIB and LIB.variant} build has no int8 kernel (it needs AVX2)")


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("out_features, in_features", [(1001, 64), (33, 202)])
def test_blocks_round_trip_and_bound_the_error(bits, out_features, in_features, gen):
    """pack/unpack are inverses; each weight is within half a step of its block's scale (8 bits), or one step
    (4 bits: the side opposite the block's largest magnitude may clamp at +7); 202 inputs: a last block of 10."""
    weight = torch.randn(out_features, in_features, generator=gen) * 0.05
    weight[3, 40:] *= 30  # one loud block must not cost the others their precision
    q, scales = native.quantize_blocks(weight, bits)
    assert q.dtype == torch.int8 and scales.dtype == torch.float16 and scales.shape == (out_features, -(-in_features // 32))
    assert int(q.min()) >= (-127 if bits == 8 else -8) and int(q.max()) <= (127 if bits == 8 else 7)
    packed, tile_scales = native.pack_block_weight(q, scales, bits)
    assert packed.shape == (-(-out_features // 16), scales.shape[1], 16 * 32 * bits // 8)
    q2, scales2 = native.unpack_block_weight(packed, tile_scales, bits, out_features, in_features)
    assert torch.equal(q2, q) and torch.equal(scales2, scales)
    step = scales.float().abs().repeat_interleave(32, dim=1)[:, :in_features]
    error = (native.dequantize_blocks(q, scales) - weight).abs()
    # 4 bits: the clamped end is 8 steps out, so the scale's fp16 rounding (2 ** -11) counts 8 times there
    assert (error <= step * (0.5 if bits == 8 else 1 + 8 * 2**-11) + 1e-7).all()
    assert error[0].max() < error[3].max() / 10  # the quiet row kept its own, finer scales


def _reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """In float64: each block of 32 inputs of each row of x quantized symmetric int8 (its max |x| / 127), times
    the dequantized weight."""
    blocks = torch.nn.functional.pad(x, (0, -x.shape[1] % 32)).view(x.shape[0], -1, 32)
    top = blocks.abs().amax(dim=2, keepdim=True)
    step = (top / 127).clamp(min=1e-30)
    x_deq = torch.where(top > 0, torch.round(blocks / step) * step, blocks).view(x.shape[0], -1)[:, :x.shape[1]]
    return torch.nn.functional.linear(x_deq.double(), weight.double(), None if bias is None else bias.double())


@NO_INT8
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 2, 3, 9, 17])
@pytest.mark.parametrize("in_features", [64, 202])
def test_linear_block_matches_its_dequantized_reference(bits, rows, in_features, gen):
    """Equal, to fp32 rounding, to dequantized weights times dequantized rows; a row of zeros gives the bias.
    1001 channels: a last tile of 9; 202 inputs: a padded last block; 9 and 17 rows: whole passes and a
    remainder on either instruction set; rows of very different magnitudes, each with its own scale."""
    weight = torch.randn(1001, in_features, generator=gen) * 0.05
    bias = torch.randn(1001, generator=gen)
    packed, scales = native.pack_block_weight(*native.quantize_blocks(weight, bits), bits)
    w_deq = native.dequantize_blocks(*native.quantize_blocks(weight, bits))
    x = torch.randn(rows, in_features, generator=gen) * torch.logspace(-2, 2, rows)[:, None]
    x[0, 5] *= 100  # an outlier: its block's scale, not the row's
    if rows > 1:
        x[1] = 0.0
    want = _reference(x, w_deq, bias)
    got = LIB.linear_block(x, packed, scales, bits, 1001, bias)
    torch.testing.assert_close(got.double(), want, atol=1e-4 * want.abs().max().item(), rtol=1e-5)
    torch.testing.assert_close(LIB.linear_block(x, packed, scales, bits, 1001), got - bias, atol=1e-4, rtol=1e-5)
    if rows > 1:
        assert torch.equal(got[1], bias)


@NO_INT8
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
def test_linear_block_keeps_a_non_finite_row_to_itself(bits, poison, gen):
    """A row with NaN or infinity gives NaN outputs (the runner then fails that request alone); the other rows
    are untouched."""
    weight = torch.randn(300, 128, generator=gen) * 0.05
    packed, scales = native.pack_block_weight(*native.quantize_blocks(weight, bits), bits)
    x = torch.randn(3, 128, generator=gen)
    clean = LIB.linear_block(x, packed, scales, bits, 300)
    x[1, 7] = poison
    got = LIB.linear_block(x, packed, scales, bits, 300)
    assert torch.isnan(got[1]).all()
    assert torch.equal(got[0], clean[0]) and torch.equal(got[2], clean[2])
