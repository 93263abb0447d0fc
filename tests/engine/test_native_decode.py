"""The whole-stack C decode step (lmservice/engine/native_decode.py, lmservice/kernels/cpu_native.py gpt2_decode_step):
the same hidden states and KV writes as the op-by-op forward, for fp32, int8 and int4 projections and for each
KV-cache format, the runner
sending it exactly the steps it is for, and `cpu_kernels torch` running no C code at all (counted)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import GPT2LMHeadModel

from lmservice.engine.engine import Engine, EngineConfig
from lmservice.engine.fast_path import StepBatch
from lmservice.engine.native_decode import NativeDecoder
from lmservice.engine.sampling_params import SamplingParams
from lmservice.kernels import CpuKernels, native_ops
from lmservice.kernels.cpu_native import native_library
from lmservice.kernels.cpu_policy import DECODE_STEP_INT8_ROWS, DECODE_STEP_ROWS
from lmservice.kernels.kv_cache import LayerKVCache, quantize_kv_int8, widen_kv
from lmservice.model.gpt2 import AttentionMetadata
from lmservice.model.loader import load_model
from tests.helpers import make_gpt2_dir, prompts, run_to_completion

LIB = native_library()
pytestmark = pytest.mark.skipif(LIB is None, reason="no native kernels built for this CPU (no C compiler at install "
                                                    "time): the engine uses torch ops")
INT8 = LIB is not None and LIB.has_int8

# n_embd 72: dot products with a tail past the vector width (72 % 16, 72 % 64) and head_dim 18
SHAPE = dict(vocab_size=500, n_positions=96, n_embd=72, n_layer=3, n_head=4)
QUANTIZATIONS = ["none", *(pytest.param(q, marks=pytest.mark.skipif(
    not INT8, reason=f"the {LIB and LIB.variant} build has no int8 kernel (it needs AVX2)")) for q in ("int8", "int4"))]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_gpt2_dir(tmp_path_factory.mktemp("native-decode") / "model", seed=4, **SHAPE)


def _decode_batch(rows: int, block_size: int, num_blocks: int, g: torch.Generator):
    """rows sequences of ragged lengths over shuffled blocks: ids, positions, slots, seq_lens, tables."""
    lens = torch.randint(1, SHAPE["n_positions"], (rows,), generator=g).tolist()
    lens[0] = SHAPE["n_positions"]  # one full context
    width = -(-max(lens) // block_size)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.tensor([perm[i * width:(i + 1) * width] for i in range(rows)], dtype=torch.int32)
    positions = torch.tensor(lens) - 1
    slots = tables[torch.arange(rows), positions // block_size].long() * block_size + positions % block_size
    ids = torch.randint(0, SHAPE["vocab_size"], (rows,), generator=g).tolist()
    return ids, positions, slots, torch.tensor(lens, dtype=torch.int32), tables


def _both_paths(model_dir, quantization: str, rows: int, block_size: int, kv_dtype: torch.dtype):
    """One decode step of `rows` sequences over random caches stored in `kv_dtype`, through the C step and the op-by-op
    forward (on copies of the caches): (C hidden states, op-by-op ones, C caches, op-by-op caches, written slots)."""
    loaded = load_model(model_dir, "cpu", "float32", quantization=quantization)
    model, c = loaded.model, loaded.config
    kernels = CpuKernels.using(LIB)
    # the op-by-op int8 path on the C int8 kernel at every row count (the C step's), not FBGEMM's
    model.use_cpu_kernels(replace(kernels, linear_int8_rows=rows if INT8 else 0))
    num_blocks = rows * -(-c.n_positions // block_size)
    g = torch.Generator().manual_seed(rows * 100 + block_size)
    caches = []
    for _ in range(c.n_layer):
        k, v = (torch.randn(num_blocks, block_size, c.n_head, c.head_dim, generator=g) for _ in range(2))
        if kv_dtype == torch.int8:
            (k, k_scales), (v, v_scales) = quantize_kv_int8(k), quantize_kv_int8(v)
            caches.append(LayerKVCache(k, v, k_scales, v_scales))
        else:
            caches.append(LayerKVCache(k.to(kv_dtype), v.to(kv_dtype)))
    ids, positions, slots, seq_lens, tables = _decode_batch(rows, block_size, num_blocks, g)
    ops = native_ops(LIB)
    meta = AttentionMetadata(slot_mapping=slots, num_decode_tokens=rows, decode_seq_lens=seq_lens,
                             decode_block_tables=tables, prefill_cu_seqlens_q=torch.zeros(1, dtype=torch.int32),
                             prefill_seq_lens=torch.zeros(0, dtype=torch.int32),
                             prefill_block_tables=torch.zeros(0, tables.shape[1], dtype=torch.int32),
                             decode_plan=ops.plan_decode(seq_lens, tables, block_size))
    op_caches = [LayerKVCache(*(None if t is None else t.clone() for t in kv)) for kv in caches]
    with torch.inference_mode():
        want = model(torch.tensor(ids), positions, meta, op_caches, ops)
        decoder = NativeDecoder.build(model, caches, kernels)
        assert decoder is not None
        got = decoder.run(StepBatch(ids, positions, slots, seq_lens, tables, rows, None))
    return got, want, caches, op_caches, slots


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 6, 9])
@pytest.mark.parametrize("block_size", [1, 16])
def test_decode_step_matches_the_op_by_op_forward(model_dir, quantization, rows, block_size):
    got, want, caches, op_caches, _ = _both_paths(model_dir, quantization, rows, block_size, torch.float32)
    # int8: both paths quantize each row the same way (the same int8 kernel). int4 quantizes x per block of 32:
    # a LayerNorm output that differs by an ulp between C and torch can round to the next level in a block of
    # small values, which moves the outputs by about that block's step (a wrong sum would move them by O(1))
    atol, rtol = (2e-3, 1e-2) if quantization == "int4" else (2e-5, 1e-4)
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    for kv, kv_ref in zip(caches, op_caches, strict=True):
        torch.testing.assert_close(kv.k, kv_ref.k, atol=1e-5, rtol=1e-5)  # the written slots agree, the rest untouched
        torch.testing.assert_close(kv.v, kv_ref.v, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("quantization", ["none", QUANTIZATIONS[1]])
@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.bfloat16, torch.int8], ids=["fp16", "bf16", "int8"])
@pytest.mark.parametrize("rows", [1, 4, 9])
@pytest.mark.parametrize("block_size", [1, 16])
def test_decode_step_on_a_narrow_cache_matches_the_op_by_op_forward(model_dir, quantization, kv_dtype, rows,
                                                                    block_size):
    """The C step's KV write (its own conversion, int8 quantization) and attention over a narrow cache against the
    op-by-op forward: torch's write (the reference) and the C attention. The written slots hold the same values up
    to one rounding step of the format (the two paths' K and V differ by fp32 rounding before they are stored)."""
    got, want, caches, op_caches, slots = _both_paths(model_dir, quantization, rows, block_size, kv_dtype)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-2)
    num_slots, n_head, head_dim = caches[0].k.shape[0] * caches[0].k.shape[1], *caches[0].k.shape[2:]
    written = torch.zeros(num_slots, dtype=torch.bool)
    written[slots] = True
    for kv, kv_ref in zip(caches, op_caches, strict=True):
        for x, ref, s, s_ref in ((kv.k, kv_ref.k, kv.k_scales, kv_ref.k_scales),
                                 (kv.v, kv_ref.v, kv.v_scales, kv_ref.v_scales)):
            wide = widen_kv(x, s).view(num_slots, n_head, head_dim)
            wide_ref = widen_kv(ref, s_ref).view(num_slots, n_head, head_dim)
            assert torch.equal(wide[~written], wide_ref[~written])  # the rest untouched
            ulp = 2**-10 if kv_dtype == torch.float16 else 2**-7
            step = s_ref.view(num_slots, n_head, 1) if s_ref is not None else wide_ref.abs() * ulp
            assert ((wide - wide_ref).abs()[written] <= step[written] * 1.01 + 1e-6).all()


def test_greedy_tokens_match_transformers_through_the_native_step(model_dir):
    """Few sequences at a time, so most steps are pure decodes of a few rows: transformers' tokens."""
    hf = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    ps = prompts(6, SHAPE["vocab_size"], 1, 30, seed=5)
    engine = Engine(load_model(model_dir, "cpu", "float32"),
                    EngineConfig.from_fields(num_kv_blocks=64, max_num_seqs=3, cpu_kernels="native"))
    runner = engine.runner
    assert isinstance(runner.fast_path, NativeDecoder)
    calls = []
    run = runner.fast_path.run
    runner.fast_path.run = lambda batch: calls.append(batch.num_decodes) or run(batch)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    out = run_to_completion(engine, [(str(i), p, params) for i, p in enumerate(ps)], stagger=2)
    with torch.no_grad():
        for i, p in enumerate(ps):
            ids = torch.tensor([p])
            want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                               pad_token_id=0)[0, len(p):].tolist()
            assert out[str(i)]["tokens"][0] == want, f"prompt {i}"
    assert len(calls) > 20 and set(calls) <= {1, 2, 3}


def test_steps_it_is_not_for_take_the_op_by_op_path(model_dir):
    """Prefills, mixed steps and more than max_rows decodes never reach the native step."""
    engine = Engine(load_model(model_dir, "cpu", "float32"),
                    EngineConfig.from_fields(num_kv_blocks=128, cpu_kernels="native"))
    runner = engine.runner
    max_rows = 4
    runner.fast_path.max_rows = max_rows
    seen = []
    run = runner.fast_path.run
    runner.fast_path.run = lambda batch: seen.append(batch.num_decodes) or run(batch)
    forward = runner._forward_eager
    eager = []
    runner._forward_eager = lambda batch, cu: eager.append((len(batch.input_ids), batch.num_decodes)) or forward(batch, cu)
    # all prefilled together, then max_rows + 2 decodes until the two short ones end: max_rows
    requests = [(str(i), p, SamplingParams(temperature=0.0, max_tokens=3 if i < 2 else 6, ignore_eos=True))
                for i, p in enumerate(prompts(max_rows + 2, SHAPE["vocab_size"], 2, 9))]
    run_to_completion(engine, requests)
    assert eager and all(tokens > nd or nd > max_rows for tokens, nd in eager)  # a prefill in it, or too many rows
    assert any(nd == max_rows + 2 for _, nd in eager) and seen and set(seen) == {max_rows}


def test_not_built_for_what_it_does_not_compute(tmp_path, model_dir):
    exact_gelu = make_gpt2_dir(tmp_path / "gelu", seed=1, activation_function="gelu", **SHAPE)
    engine = Engine(load_model(exact_gelu, "cpu", "float32"), EngineConfig.from_fields(num_kv_blocks=16,
                                                                                      cpu_kernels="native"))
    assert engine.runner.fast_path is None
    for quantization in ("none", "int8", "int4") if INT8 else ("none",):
        engine = Engine(load_model(model_dir, "cpu", "float32", quantization=quantization),
                        EngineConfig.from_fields(num_kv_blocks=16, cpu_kernels="native"))
        rows = DECODE_STEP_INT8_ROWS[LIB.int8_kernel] if quantization == "int8" else DECODE_STEP_ROWS  # int4: C anyway
        assert engine.runner.fast_path.max_rows == rows
    if not INT8:  # int8 weights the library cannot multiply: op by op (FBGEMM), never the C step
        engine = Engine(load_model(model_dir, "cpu", "float32", quantization="int8"),
                        EngineConfig.from_fields(num_kv_blocks=16, cpu_kernels="native"))
        assert engine.runner.fast_path is None
    for settings in (dict(attention_backend="torch"), dict(cpu_kernels="torch")):
        torch_ops = Engine(load_model(model_dir, "cpu", "float32"), EngineConfig.from_fields(num_kv_blocks=16, **settings))
        assert torch_ops.runner.fast_path is None and torch_ops.ops.name == "torch"


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_cpu_kernels_torch_runs_no_c_code(model_dir, quantization, monkeypatch):
    """Every function of the loaded library counted: none is called by a `cpu_kernels torch` engine (decodes
    of 1 and of several rows, prefills, oneDNN linears on this model), and each path calls them under
    `native` (the negative control)."""
    counts: dict[str, int] = {}
    for name in ("paged_decode_attention", "linear_few_rows_f32", "linear_few_rows_q8", "linear_few_rows_qblock",
                 "gpt2_decode_step"):
        if hasattr(LIB.lib, name) and (name not in ("linear_few_rows_q8", "linear_few_rows_qblock") or INT8):
            fn = getattr(LIB.lib, name)
            monkeypatch.setattr(LIB.lib, name, lambda *a, fn=fn, name=name: counts.update({name: counts.get(name, 0) + 1}) or fn(*a))
    requests = [(str(i), p, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
                for i, p in enumerate(prompts(6, SHAPE["vocab_size"], 2, 9))]
    for cpu_kernels, fast_path_rows in (("torch", 0), ("native", 0), ("native", DECODE_STEP_ROWS)):
        counts.clear()
        loaded = load_model(model_dir, "cpu", "float32", quantization=quantization, linear_backend="onednn")
        engine = Engine(loaded, EngineConfig.from_fields(num_kv_blocks=64, max_num_seqs=3, cpu_kernels=cpu_kernels))
        if engine.runner.fast_path is not None:
            engine.runner.fast_path.max_rows = fast_path_rows  # 0: the op-by-op path's own C calls
        run_to_completion(engine, requests, stagger=1)
        if cpu_kernels == "torch":
            assert counts == {}, counts
        elif fast_path_rows:
            assert counts.get("gpt2_decode_step", 0) > 0
        else:
            # int8 op by op: the C kernel where the policy gives it rows (AVX-512 VNNI), else FBGEMM's
            int8_rows = CpuKernels.using(LIB).linear_int8_rows
            linear = {"none": "linear_few_rows_f32", "int8": "linear_few_rows_q8" if int8_rows else None,
                      "int4": "linear_few_rows_qblock"}[quantization]
            assert linear is None or counts.get(linear, 0) > 0, counts
            assert counts.get("paged_decode_attention", 0) > 0, counts


def test_the_fast_path_takes_only_plain_decodes_it_has_room_for(model_dir):
    """can_run: pure decodes without an adapter, 1 to max_rows of them; a prefill in the step, or LoRA, no."""
    engine = Engine(load_model(model_dir, "cpu", "float32"), EngineConfig.from_fields(num_kv_blocks=16))
    decoder = engine.runner.fast_path
    assert isinstance(decoder, NativeDecoder)

    def batch(num_tokens: int, num_seqs: int, num_decodes: int, lora=None) -> StepBatch:
        return StepBatch(list(range(num_tokens)), torch.zeros(num_tokens, dtype=torch.long),
                         torch.zeros(num_tokens, dtype=torch.long), torch.ones(num_seqs, dtype=torch.int32),
                         torch.zeros(num_seqs, 1, dtype=torch.int32), num_decodes, lora)

    assert decoder.can_run(batch(3, 3, 3))
    assert decoder.can_run(batch(decoder.max_rows, decoder.max_rows, decoder.max_rows))
    assert not decoder.can_run(batch(decoder.max_rows + 1, decoder.max_rows + 1, decoder.max_rows + 1))
    assert not decoder.can_run(batch(7, 3, 2))  # two decodes and a prefill chunk
    assert not decoder.can_run(batch(3, 3, 3, lora=object()))  # an adapter in the step
