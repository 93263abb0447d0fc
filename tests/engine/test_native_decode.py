"""The whole-stack C decode step (lmservice/engine/native_decode.py, lmservice/kernels/cpu_native.py gpt2_decode_step):
the same hidden states and KV writes as the op-by-op forward, for fp32 and int8 projections, and the
runner sending it exactly the steps it is for."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel

from lmservice.engine.engine import Engine, EngineConfig
from lmservice.engine.native_decode import MAX_ROWS, NativeDecoder
from lmservice.engine.sampling_params import SamplingParams
from lmservice.kernels import load_ops
from lmservice.kernels.cpu_native import FEW_ROWS, int8_kernel_available, native_library
from lmservice.model.gpt2 import AttentionMetadata
from lmservice.model.loader import load_model
from lmservice.model.quantize import Int8Linear
from tests.helpers import make_gpt2_dir, prompts, run_to_completion

pytestmark = pytest.mark.skipif(native_library() is None, reason="no C compiler: the native kernels are not built")

# n_embd 72: dot products with a tail past the vector width (72 % 16, 72 % 64) and head_dim 18
SHAPE = dict(vocab_size=500, n_positions=96, n_embd=72, n_layer=3, n_head=4)
QUANTIZATIONS = ["none", pytest.param("int8", marks=pytest.mark.skipif(
    not int8_kernel_available(), reason="the int8 kernel needs AVX-512 VNNI"))]


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


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 6, 9])
@pytest.mark.parametrize("block_size", [1, 16])
def test_decode_step_matches_the_op_by_op_forward(model_dir, quantization, rows, block_size):
    loaded = load_model(model_dir, "cpu", "float32", quantization=quantization)
    model, c = loaded.model, loaded.config
    for module in model.modules():  # past FEW_ROWS the op-by-op int8 path is FBGEMM's: take the same kernel
        if isinstance(module, Int8Linear):
            module.native_rows = rows
    num_blocks = rows * -(-c.n_positions // block_size)
    g = torch.Generator().manual_seed(rows * 100 + block_size)
    caches = [(torch.randn(num_blocks, block_size, c.n_head, c.head_dim, generator=g),
               torch.randn(num_blocks, block_size, c.n_head, c.head_dim, generator=g)) for _ in range(c.n_layer)]
    ids, positions, slots, seq_lens, tables = _decode_batch(rows, block_size, num_blocks, g)

    ops = load_ops("native")
    meta = AttentionMetadata(slot_mapping=slots, num_decode_tokens=rows, decode_seq_lens=seq_lens,
                             decode_block_tables=tables, prefill_cu_seqlens_q=torch.zeros(1, dtype=torch.int32),
                             prefill_seq_lens=torch.zeros(0, dtype=torch.int32),
                             prefill_block_tables=torch.zeros(0, tables.shape[1], dtype=torch.int32),
                             decode_plan=ops.plan_decode(seq_lens, tables, block_size))
    op_caches = [(k.clone(), v.clone()) for k, v in caches]
    with torch.inference_mode():
        want = model(torch.tensor(ids), positions, meta, op_caches, ops)
        decoder = NativeDecoder.build(model, caches)
        assert decoder is not None
        got = decoder.run(ids, positions, slots, seq_lens, tables)
    # int8: both paths quantize each row the same way (the same int8 kernel)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    for (k, v), (k_ref, v_ref) in zip(caches, op_caches, strict=True):
        torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=1e-5)  # the written slots agree, the rest untouched
        torch.testing.assert_close(v, v_ref, atol=1e-5, rtol=1e-5)


def test_greedy_tokens_match_transformers_through_the_native_step(model_dir):
    """Few sequences at a time, so most steps are pure decodes of <= FEW_ROWS rows: transformers' tokens."""
    hf = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    ps = prompts(6, SHAPE["vocab_size"], 1, 30, seed=5)
    engine = Engine(load_model(model_dir, "cpu", "float32"),
                    EngineConfig.from_fields(num_kv_blocks=64, max_num_seqs=3, attention_backend="native"))
    runner = engine.runner
    calls = []
    run = runner.native_decoder.run
    runner.native_decoder.run = lambda ids, *a: calls.append(len(ids)) or run(ids, *a)
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
                    EngineConfig.from_fields(num_kv_blocks=128, attention_backend="native"))
    runner = engine.runner
    runner.native_decoder.max_rows = FEW_ROWS
    seen = []
    run = runner.native_decoder.run
    runner.native_decoder.run = lambda ids, *a: seen.append(len(ids)) or run(ids, *a)
    forward = runner._forward_eager
    eager = []
    runner._forward_eager = lambda ids, *a: eager.append((len(ids), a[-2])) or forward(ids, *a)
    # all prefilled together, then FEW_ROWS + 2 decodes until the two short ones end: FEW_ROWS
    requests = [(str(i), p, SamplingParams(temperature=0.0, max_tokens=3 if i < 2 else 6, ignore_eos=True))
                for i, p in enumerate(prompts(FEW_ROWS + 2, SHAPE["vocab_size"], 2, 9))]
    run_to_completion(engine, requests)
    assert eager and all(tokens > nd or nd > FEW_ROWS for tokens, nd in eager)  # a prefill in it, or too many rows
    assert any(nd == FEW_ROWS + 2 for _, nd in eager) and seen and set(seen) == {FEW_ROWS}


def test_not_built_for_what_it_does_not_compute(tmp_path, model_dir):
    exact_gelu = make_gpt2_dir(tmp_path / "gelu", seed=1, activation_function="gelu", **SHAPE)
    engine = Engine(load_model(exact_gelu, "cpu", "float32"), EngineConfig.from_fields(num_kv_blocks=16,
                                                                                      attention_backend="native"))
    assert engine.runner.native_decoder is None
    for quantization in ("none", "int8") if int8_kernel_available() else ("none",):
        engine = Engine(load_model(model_dir, "cpu", "float32", quantization=quantization),
                        EngineConfig.from_fields(num_kv_blocks=16, attention_backend="native"))
        assert engine.runner.native_decoder.max_rows == MAX_ROWS
    torch_ops = Engine(load_model(model_dir, "cpu", "float32"), EngineConfig.from_fields(num_kv_blocks=16,
                                                                                        attention_backend="torch"))
    assert torch_ops.runner.native_decoder is None
