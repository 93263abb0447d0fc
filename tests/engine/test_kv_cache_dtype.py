"""--kv-cache-dtype end to end: the block pool grows as the cache narrows, every path (the C step, op by op on C or
torch kernels, Triton under the interpreter, the CUDA-graph padding path run eagerly) serves each format, greedy text
stays fp32 KV's on a small random model, and within one format the prefix cache and preemption change nothing."""

from __future__ import annotations

import pytest
import torch

from lmservice.engine.cuda_graphs import DecodeGraphs
from lmservice.engine.engine import Engine, EngineConfig
from lmservice.engine.kv_cache_tensors import kv_cache_bytes_per_block
from lmservice.engine.native_decode import NativeDecoder
from lmservice.engine.sampling_params import SamplingParams
from lmservice.kernels.cpu_native import native_library
from lmservice.kernels.kv_cache import widen_kv
from lmservice.model.loader import load_model
from tests.helpers import make_gpt2_dir, prompts, run_to_completion

KV_DTYPES = ["fp32", "fp16", "bf16", "int8"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
CPU_KERNELS = ["torch", pytest.param("native", marks=pytest.mark.skipif(
    native_library() is None, reason="no native kernels built for this CPU (no C compiler at install time)"))]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # head_dim 16; n_positions 128 with prompts up to 40 tokens and 16 new ones
    return make_gpt2_dir(tmp_path_factory.mktemp("kv-dtype") / "model", seed=3, vocab_size=500, n_embd=64, n_layer=2,
                         n_head=4)


def engine(model_dir, **fields) -> Engine:
    fields.setdefault("num_kv_blocks", 128)
    return Engine(load_model(model_dir, "cpu", "float32"), EngineConfig.from_fields(**fields))


def generate(e: Engine, ps: list[list[int]], stagger: int = 1) -> list[list[int]]:
    out = run_to_completion(e, [(str(i), p, GREEDY) for i, p in enumerate(ps)], stagger=stagger)
    assert e.pool.num_used_blocks == 0
    return [out[str(i)]["tokens"][0] for i in range(len(ps))]


def test_the_memory_budget_buys_blocks_by_the_stored_bytes(model_dir):
    """fp16 and bf16 blocks are half fp32's, int8 ones a quarter plus a 4-byte scale per token and head (16 values
    here: 20 bytes against 64); auto is the model's dtype; the log's and /metrics' bytes are the allocation's."""
    config = load_model(model_dir, "cpu", "float32").config
    per_block = {kv: kv_cache_bytes_per_block(config, 16, dtype) for kv, dtype in
                 (("fp32", torch.float32), ("fp16", torch.float16), ("int8", torch.int8))}
    assert per_block == {"fp32": 2 * 2 * 16 * 4 * 64, "fp16": 2 * 2 * 16 * 4 * 32, "int8": 2 * 2 * 16 * 4 * 20}
    blocks = {}
    for kv in ["auto", *KV_DTYPES]:
        e = engine(model_dir, num_kv_blocks=None, kv_cache_memory_mb=3, kv_cache_dtype=kv)
        described = e.runner.kv_cache.describe()
        assert described["dtype"] == ("fp32" if kv == "auto" else kv) and described["num_blocks"] == e.pool.num_blocks
        assert described["bytes"] <= 3 * 2**20 and e.runner.kv_cache.buffer.dtype == e.runner.kv_caches[0].k.dtype
        blocks[kv] = e.pool.num_blocks
    assert blocks == {"auto": 192, "fp32": 192, "fp16": 384, "bf16": 384, "int8": 614}  # 3 MiB / 5 KiB: 3.2x fp32


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_auto_stores_int8_under_quantized_weights(model_dir, quantization):
    """auto: an int8 cache for 8- and 4-bit weights (an unquantized model keeps its dtype: the test above);
    fp32 asked for is fp32."""
    for kv, want in (("auto", torch.int8), ("fp32", torch.float32)):
        e = Engine(load_model(model_dir, "cpu", "float32", quantization=quantization),
                   EngineConfig.from_fields(num_kv_blocks=16, kv_cache_dtype=kv))
        assert e.runner.kv_cache.buffer.dtype == want and e.runner.kv_caches[0].k.dtype == want


@pytest.mark.parametrize("cpu_kernels", CPU_KERNELS)
def test_greedy_tokens_with_a_narrow_cache_are_fp32_caches(model_dir, cpu_kernels):
    """Short generations on a small random model: fp16, bf16 and int8 KV give fp32 KV's tokens, on the C step and
    the C attention (native) as on torch ops; the native engines did take the C step."""
    ps = prompts(6, 500, 3, 40, seed=1)
    want = generate(engine(model_dir, cpu_kernels=cpu_kernels, kv_cache_dtype="fp32", max_num_seqs=4), ps)
    for kv in KV_DTYPES[1:]:
        e = engine(model_dir, cpu_kernels=cpu_kernels, kv_cache_dtype=kv, max_num_seqs=4)
        assert isinstance(e.runner.fast_path, NativeDecoder) == (cpu_kernels == "native")
        assert generate(e, ps) == want, kv


@pytest.mark.parametrize("kv", KV_DTYPES[1:])
def test_within_a_format_prefix_caching_chunking_and_preemption_change_nothing(model_dir, kv):
    """Requests sharing a prefix, staggered: with prefix caching off; on (hits counted); chunked prefills; and a
    pool so small that requests are preempted and recomputed. A cached block holds what recomputing it writes."""
    base = prompts(1, 500, 33, 33, seed=2)[0]
    ps = [base + tail for tail in prompts(5, 500, 1, 6, seed=3)]
    want = generate(engine(model_dir, kv_cache_dtype=kv, enable_prefix_caching=False), ps)
    cached = engine(model_dir, kv_cache_dtype=kv)
    assert generate(cached, ps) == want and cached.pool.num_hits > 0
    assert generate(engine(model_dir, kv_cache_dtype=kv, max_num_batched_tokens=9), ps) == want
    tight = engine(model_dir, kv_cache_dtype=kv, num_kv_blocks=9, enable_prefix_caching=False)
    assert generate(tight, ps, stagger=0) == want and tight.scheduler.num_preemptions > 0


@pytest.mark.parametrize("kv", ["fp16", "int8"])  # bf16: Triton's interpreter has none
def test_triton_kernels_and_the_cuda_graph_path_serve_a_narrow_cache(model_dir, kv):
    """The Triton set (under the interpreter) and the CUDA-graph padding path (static buffers, run eagerly) give the
    torch ops' tokens for the same format."""
    ps = prompts(4, 500, 3, 20, seed=4)
    want = generate(engine(model_dir, kv_cache_dtype=kv, cpu_kernels="torch"), ps)
    triton = engine(model_dir, kv_cache_dtype=kv, attention_backend="triton", block_size=8)
    assert triton.ops.name == "triton" and generate(triton, ps) == want
    graphed = engine(model_dir, kv_cache_dtype=kv, cpu_kernels="torch")
    runner = graphed.runner
    runner.fast_path = DecodeGraphs(runner.model, runner.ops, runner.kv_caches, 4, -(-graphed.max_model_len // 16),
                                    runner.device, capture=False)
    assert generate(graphed, ps) == want


@pytest.mark.parametrize("kv", KV_DTYPES)
def test_copying_blocks_copies_values_and_scales(model_dir, kv):
    """Copy-on-write of a shared block (beam search): the destination reads back as the source in every layer, int8 scales
    included; other blocks are untouched; every source is read before any destination is written."""
    e = engine(model_dir, kv_cache_dtype=kv, num_kv_blocks=6)
    cache = e.runner.kv_cache
    for t in (cache.buffer, cache.scales):
        if t is not None:
            t.copy_(torch.randn(t.shape).to(t.dtype) if t.dtype != torch.int8 else torch.randint(-127, 128, t.shape))
    wide = [[widen_kv(x, s).clone() for x, s in ((layer.k, layer.k_scales), (layer.v, layer.v_scales))]
            for layer in e.runner.kv_caches]
    e.runner.copy_blocks([(1, 2), (2, 4)])  # a beam's copy-on-write; 2 is read (into 4) before it is written
    for layer, (k_before, v_before) in zip(e.runner.kv_caches, wide, strict=True):
        for x, s, old in ((layer.k, layer.k_scales, k_before), (layer.v, layer.v_scales, v_before)):
            now = widen_kv(x, s)
            assert torch.equal(now[2], old[1]) and torch.equal(now[4], old[2])
            assert torch.equal(now[[0, 1, 3, 5]], old[[0, 1, 3, 5]])


def test_an_unknown_kv_cache_dtype_is_refused(model_dir):
    with pytest.raises(ValueError, match="kv_cache_dtype 'fp8' is not one of auto, fp32, fp16, bf16, int8"):
        engine(model_dir, kv_cache_dtype="fp8")
