"""lmservice/kernels/cpu_native.py: the C decode attention and linears against the per-sequence loop, the torch
path and F.linear, on the library this CPU loads (tests/kernels/test_cpu_isa.py re-runs them on the others)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lmservice.kernels.cpu_native as native
from lmservice.kernels.attention import decode_attention_torch
from tests.kernels.paged_batch import make_paged_batch
from tests.kernels.test_attention import SCALE, decode_by_loop

LIB = native.native_library()
if LIB is None:
    pytest.skip("no native kernels built for this CPU (no C compiler at install time): the engine uses torch ops",
                allow_module_level=True)
NO_INT8 = pytest.mark.skipif(not LIB.has_int8, reason=f"the {LIB.variant} build has no int8 kernel (it needs AVX2)")


@pytest.mark.parametrize("block_size", [1, 16, 32])
def test_decode_matches_loop_on_poisoned_cache(block_size, gen):
    """NaN everywhere outside the written contexts, -1-padded tables, q a strided view of a fused qkv,
    sequences ending mid-block, at a block's end and one past it."""
    seq_lens = [1, block_size, block_size + 1, 3 * block_size + 5, 2]
    b = make_paged_batch(seq_lens, [1] * len(seq_lens), block_size, 3, torch.float32, gen)
    assert not b.q.is_contiguous()
    out = LIB.decode_attention(b.q, b.k_cache, b.v_cache, b.seq_lens, b.block_tables, SCALE)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, decode_by_loop(b.q, b.k_cache, b.v_cache, b.seq_lens, b.block_tables),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_one_plan_serves_every_layer_and_any_thread_count(threads, gen):
    """A step's plan is built once and reused by each layer's cache; the result does not depend on how
    many threads share the (sequence, head) items."""
    b = make_paged_batch([7, 40, 17, 300, 1], [1] * 5, 16, 4, torch.float32, gen)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        plan = native.plan_decode_native(b.seq_lens, b.block_tables, 16)
        assert plan.threads == threads and plan.max_seq_len == 300
        other_k, other_v = torch.randn_like(b.k_cache), torch.randn_like(b.v_cache)  # a second layer's cache
        for k_cache, v_cache in ((b.k_cache, b.v_cache), (other_k, other_v)):
            got = LIB.decode_attention(b.q, k_cache, v_cache, b.seq_lens, b.block_tables, SCALE, plan)
            want = decode_attention_torch(b.q, k_cache, v_cache, b.seq_lens, b.block_tables, SCALE)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("num_heads", [1, 5, 12])
def test_few_sequences_split_their_heads(num_heads, gen):
    """One or two sequences leave threads idle unless their heads are split into groups (5 heads over
    4 items: groups of 2, 2 and 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for seq_lens in ([70], [3, 33]):
            b = make_paged_batch(seq_lens, [1] * len(seq_lens), 16, num_heads, torch.float32, gen)
            plan = native.plan_decode_native(b.seq_lens, b.block_tables, 16)
            assert plan.items_per_seq == 4 // len(seq_lens)
            got = LIB.decode_attention(b.q, b.k_cache, b.v_cache, b.seq_lens, b.block_tables, SCALE, plan)
            torch.testing.assert_close(got, decode_by_loop(b.q, b.k_cache, b.v_cache, b.seq_lens, b.block_tables),
                                       atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(before)


def test_the_cache_is_only_read(gen):
    b = make_paged_batch([5, 20], [1, 1], 16, 2, torch.float32, gen)
    k_before, v_before = b.k_cache.clone(), b.v_cache.clone()
    LIB.decode_attention(b.q, b.k_cache, b.v_cache, b.seq_lens, b.block_tables, SCALE)
    assert torch.equal(b.k_cache.nan_to_num(), k_before.nan_to_num())
    assert torch.equal(b.v_cache.nan_to_num(), v_before.nan_to_num())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_it_runs_on_torchs_openmp_runtime():
    """The library shares torch's libgomp (one thread pool), never loads a second OpenMP runtime. In a
    fresh process: other packages (sentencepiece) bring OpenMP runtimes of their own."""
    script = ("import re, torch, lmservice.kernels.cpu_native as n; assert n.native_library() is not None; "
              "print(sorted(set(re.findall(r'\\S*lib(?:gomp|iomp5|omp)[^/\\s]*\\.so[^/\\s]*', "
              "open('/proc/self/maps').read()))))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout
    runtimes = ast.literal_eval(out.strip())
    assert len(runtimes) == 1 and Path(runtimes[0]).parent == Path(torch.__file__).parent / "lib", runtimes


def test_loading_it_leaves_subnormals_alone():
    """Built with -ffast-math but not linked with it: crtfastmath.o would set flush-to-zero process-wide
    (torch's and Python's arithmetic would lose subnormals, and hypothesis refuses to run)."""
    assert native.native_library() is not None
    assert sys.float_info.min / 4 > 0.0
    assert float(torch.tensor(1e-39) * 1.0) > 0.0


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 9])
def test_linear_few_rows_matches_f_linear(rows, gen):
    """Each weight row read once for all rows (from 5 rows, 4 weight rows at a time): same result as F.linear,
    with and without bias, for a strided 3-D input; 100 inputs: a tail past the vector width; 1001 outputs:
    one past the last whole tile."""
    weight = torch.randn(1001, 100, generator=gen)
    bias = torch.randn(1001, generator=gen)
    x = torch.randn(rows, 2 * 100, generator=gen)[:, ::2]  # not contiguous
    want = torch.nn.functional.linear(x, weight, bias)
    torch.testing.assert_close(LIB.linear_f32(x, weight, bias), want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(LIB.linear_f32(x, weight), want - bias, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(LIB.linear_f32(x[None], weight, bias), want[None], atol=1e-4, rtol=1e-5)


@NO_INT8
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 9, 17])
@pytest.mark.parametrize("in_features", [64, 202])
def test_linear_few_rows_int8_matches_its_dequantized_reference(rows, in_features, gen):
    """int8 weights x int8 activations (each row quantized on its own, symmetric, max |x| / 127): equal, to
    fp32 rounding, to dequantized weights times dequantized rows; a row of zeros gives the bias. 1001
    channels: a last 16-channel tile of 9; 202 inputs: a last group of 4 with 2; 9 and 17 rows: passes of 8
    and a remainder."""
    weight = torch.randint(-127, 128, (1001, in_features), generator=gen, dtype=torch.int8)
    scales = torch.rand(1001, generator=gen) * 0.01
    bias = torch.randn(1001, generator=gen)
    x = torch.randn(rows, in_features, generator=gen) * torch.logspace(-2, 2, rows)[:, None]
    if rows > 1:
        x[1] = 0.0
    sums, packed = weight.sum(dim=1, dtype=torch.int32), native.pack_int8_weight(weight)
    assert torch.equal(native.unpack_int8_weight(packed, 1001, in_features), weight)
    step = (x.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-30)
    x_deq = torch.where(x.abs().amax(dim=1, keepdim=True) > 0, torch.round(x / step) * step, x)
    want = torch.nn.functional.linear(x_deq.double(), (weight.double() * scales.double()[:, None]), bias.double())
    got = LIB.linear_int8(x, packed, sums, scales, bias)
    torch.testing.assert_close(got.double(), want, atol=1e-4 * want.abs().max().item(), rtol=1e-5)
    torch.testing.assert_close(LIB.linear_int8(x, packed, sums, scales), got - bias, atol=1e-4, rtol=1e-5)
    if rows > 1:
        assert torch.equal(got[1], bias)


@NO_INT8
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
def test_linear_few_rows_int8_keeps_a_non_finite_row_to_itself(poison, gen):
    """A row with NaN or infinity gives NaN outputs (as fp32 would: the runner then fails that request alone);
    the other rows, each quantized on its own, are untouched. (Built with -ffast-math: the check is on bits.)"""
    weight = torch.randint(-127, 128, (300, 128), generator=gen, dtype=torch.int8)
    scales, sums = torch.rand(300, generator=gen) * 0.01, weight.sum(dim=1, dtype=torch.int32)
    packed = native.pack_int8_weight(weight)
    x = torch.randn(3, 128, generator=gen)
    clean = LIB.linear_int8(x, packed, sums, scales)
    x[1, 7] = poison
    got = LIB.linear_int8(x, packed, sums, scales)
    assert torch.isnan(got[1]).all()
    assert torch.equal(got[0], clean[0]) and torch.equal(got[2], clean[2])


def test_calls_are_named_while_a_profiler_records(gen):
    """benchmarks/profile_step.py files the native calls under their names (only while it records)."""
    b = make_paged_batch([5, 20], [1, 1], 16, 2, torch.float32, gen)
    with torch.profiler.profile() as prof:
        LIB.decode_attention(b.q, b.k_cache, b.v_cache, b.seq_lens, b.block_tables, SCALE)
        LIB.linear_f32(torch.randn(2, 8), torch.randn(4, 8))
    names = {evt.key for evt in prof.key_averages()}
    assert {"native::paged_decode_attention", "native::linear_few_rows"} <= names
