"""bfloat16 models on the C kernels (lmservice/kernels/cpu_policy.py): the bf16-weight linear against fp32
arithmetic on the same weights, the whole C decode step of a bf16 model against the op-by-op forward of an fp32
model holding exactly the bf16 values, a NaN row failing alone, the C decode attention on bf16 queries, and an
engine sending its decode steps and LM head to C and its prefills to oneDNN."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel

from lmservice.engine.engine import Engine, EngineConfig
from lmservice.engine.fast_path import StepBatch
from lmservice.engine.native_decode import NativeDecoder
from lmservice.engine.sampling_params import SamplingParams
from lmservice.kernels import CpuKernels, choose_kernels, native_ops
from lmservice.kernels.attention import decode_attention_torch
from lmservice.kernels.cpu_native import native_library
from lmservice.kernels.cpu_policy import DECODE_STEP_BF16_ROWS, FEW_ROWS_BF16
from lmservice.kernels.kv_cache import LayerKVCache
from lmservice.model.gpt2 import AttentionMetadata
from lmservice.model.loader import load_model
from tests.helpers import make_gpt2_dir, prompts, run_to_completion

LIB = native_library()
pytestmark = pytest.mark.skipif(LIB is None, reason="no native kernels built for this CPU (no C compiler at install "
                                                    "time): the engine uses torch ops")

# n_embd 72: dot products with a tail past the vector width, as in test_native_decode.py
SHAPE = dict(vocab_size=500, n_positions=96, n_embd=72, n_layer=3, n_head=4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_gpt2_dir(tmp_path_factory.mktemp("native-bf16") / "model", seed=6, **SHAPE)


def _rounded_fp32(model_dir):
    """The fp32 model whose every parameter is its bf16 value: what a bf16 model's C step computes with."""
    loaded = load_model(model_dir, "cpu", "float32")
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.copy_(p.bfloat16().float())
    return loaded


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("shape", [(72, 101), (64, 48), (7, 5)])
def test_bf16_linear_is_fp32_arithmetic_on_the_bf16_weights(rows, shape):
    in_features, out_features = shape
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(out_features, in_features, generator=g).bfloat16()
    bias = torch.randn(out_features, generator=g)
    x = torch.randn(rows, in_features, generator=g)
    got = LIB.linear_bf16(x, w, bias)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, F.linear(x, w.float(), bias), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(LIB.linear_bf16(x.bfloat16(), w), F.linear(x.bfloat16().float(), w.float()),
                               atol=2e-5, rtol=1e-5)


def test_a_nan_row_fails_alone():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(50, 72, generator=g).bfloat16()
    x = torch.randn(3, 72, generator=g)
    x[1, 70] = float("nan")  # in the tail past the last whole vector
    y = LIB.linear_bf16(x, w)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()
    torch.testing.assert_close(y[[0, 2]], F.linear(x[[0, 2]], w.float()), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 3, 9])
@pytest.mark.parametrize("block_size", [1, 16])
def test_decode_step_of_a_bf16_model_is_fp32_arithmetic_on_its_weights(model_dir, rows, block_size):
    """A bf16 model's C step (bf16 projections widened, fp32 LayerNorm copies, a bf16 cache) against the op-by-op
    forward of the fp32 model holding the same values over the same bf16 cache: the same hidden states and the
    same cache writes."""
    bf16 = load_model(model_dir, "cpu", "bfloat16")
    ref = _rounded_fp32(model_dir)
    c = bf16.config
    ref.model.use_cpu_kernels(CpuKernels.using(LIB))
    num_blocks = rows * -(-c.n_positions // block_size)
    g = torch.Generator().manual_seed(rows * 10 + block_size)
    caches = [LayerKVCache(*(torch.randn(num_blocks, block_size, c.n_head, c.head_dim, generator=g).bfloat16()
                             for _ in range(2))) for _ in range(c.n_layer)]
    lens = torch.randint(1, c.n_positions, (rows,), generator=g)
    width = -(-int(lens.max()) // block_size)
    tables = torch.randperm(num_blocks, generator=g)[:rows * width].view(rows, width).to(torch.int32)
    positions = lens - 1
    slots = tables[torch.arange(rows), positions // block_size].long() * block_size + positions % block_size
    ids = torch.randint(0, c.vocab_size, (rows,), generator=g).tolist()
    seq_lens = lens.to(torch.int32)
    ops = native_ops(LIB)
    meta = AttentionMetadata(slot_mapping=slots, num_decode_tokens=rows, decode_seq_lens=seq_lens,
                             decode_block_tables=tables, prefill_cu_seqlens_q=torch.zeros(1, dtype=torch.int32),
                             prefill_seq_lens=torch.zeros(0, dtype=torch.int32),
                             prefill_block_tables=torch.zeros(0, width, dtype=torch.int32),
                             decode_plan=ops.plan_decode(seq_lens, tables, block_size))
    op_caches = [LayerKVCache(kv.k.clone(), kv.v.clone()) for kv in caches]
    with torch.inference_mode():
        want = ref.model(torch.tensor(ids), positions, meta, op_caches, ops)
        decoder = NativeDecoder.build(bf16.model, caches, CpuKernels.using(LIB, torch.bfloat16))
        assert decoder is not None and decoder.max_rows == DECODE_STEP_BF16_ROWS
        got = decoder.run(StepBatch(ids, positions, slots, seq_lens, tables, rows, None))
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)
        # the LM head on those rows: C (fp32 logits) up to FEW_ROWS_BF16 rows, else oneDNN in bf16
        bf16.model.use_cpu_kernels(CpuKernels.using(LIB, torch.bfloat16))
        logits = bf16.model.compute_logits(got)
        want_logits = ref.model.compute_logits(want)
        if rows <= FEW_ROWS_BF16:
            assert logits.dtype == torch.float32
            torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=1e-4)
        else:
            assert logits.dtype == torch.bfloat16
            torch.testing.assert_close(logits.float(), want_logits, atol=0.05, rtol=0.02)
    for kv, kv_ref in zip(caches, op_caches, strict=True):
        # both round the same fp32 K and V to bf16; they may differ by one rounding step where fp32 sums differ
        for x, x_ref in ((kv.k, kv_ref.k), (kv.v, kv_ref.v)):
            assert ((x.float() - x_ref.float()).abs() <= x_ref.float().abs() * 2**-7 + 1e-6).all()


def test_policy_for_bf16_models():
    """C for the decode step, a few-row LM head and the op-by-op decode attention; oneDNN's bf16 linears op by op;
    fp16 models run no C."""
    ops, policy = choose_kernels("auto", "auto", torch.device("cpu"), torch.bfloat16)
    assert ops.decode_attention == LIB.decode_attention and policy.library is LIB
    assert (policy.decode_step_rows, policy.linear_bf16_rows) == (DECODE_STEP_BF16_ROWS, FEW_ROWS_BF16)
    assert policy.linear_f32_rows == policy.linear_int8_rows == policy.linear_block_rows == 0
    ops, policy = choose_kernels("auto", "auto", torch.device("cpu"), torch.float16)
    assert ops.name == "torch" and policy.library is None
    with pytest.raises(ValueError, match="float32 and bfloat16"):
        choose_kernels("auto", "native", torch.device("cpu"), torch.float16)


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float32], ids=["bf16-cache", "fp32-cache"])
def test_decode_attention_takes_bf16_queries(kv_dtype):
    """A bf16 model's op-by-op decodes: bf16 queries widened, fp32 arithmetic, the output rounded to bf16; against
    torch's attention on the widened queries."""
    g = torch.Generator().manual_seed(1)
    num_seqs, n_head, head_dim, block_size = 5, 4, 18, 16
    k, v = (torch.randn(20, block_size, n_head, head_dim, generator=g).to(kv_dtype) for _ in range(2))
    q = torch.randn(num_seqs, n_head, head_dim, generator=g).bfloat16()
    seq_lens = torch.tensor([1, 17, 40, 64, 33], dtype=torch.int32)
    tables = torch.randperm(20, generator=g)[:num_seqs * 4].view(num_seqs, 4).to(torch.int32)
    got = LIB.decode_attention(q, k, v, seq_lens, tables, 0.3)
    assert got.dtype == torch.bfloat16
    want = decode_attention_torch(q.float(), k.float(), v.float(), seq_lens, tables, 0.3)
    torch.testing.assert_close(got.float(), want, atol=1e-2, rtol=1e-2)
    assert torch.equal(got, LIB.decode_attention(q.float(), k, v, seq_lens, tables, 0.3).bfloat16())


def test_engine_serves_a_bf16_model_through_c(model_dir, monkeypatch):
    """Greedy decoding of a bf16 model: its decode steps go to the C step and its LM head to the C linear (both
    counted), prefills op by op in bf16; the log-probabilities it reports for its tokens are those of
    transformers' fp32 model on the same bf16 values, within bf16 activations' rounding (the prefills)."""
    counts = {"gpt2_decode_step": 0, "linear_few_rows_bf16": 0}
    for name in counts:
        fn = getattr(LIB.lib, name)

        def counted(*args, _fn=fn, _name=name):
            counts[_name] += 1
            return _fn(*args)

        monkeypatch.setattr(LIB.lib, name, counted)
    engine = Engine(load_model(model_dir, "cpu", "bfloat16"),
                    EngineConfig.from_fields(num_kv_blocks=64, max_num_seqs=3, cpu_kernels="native"))
    assert isinstance(engine.runner.fast_path, NativeDecoder) and engine.ops.name == "native"
    ps = prompts(4, SHAPE["vocab_size"], 3, 20, seed=7)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=0)
    out = run_to_completion(engine, [(str(i), p, params) for i, p in enumerate(ps)], stagger=1)
    assert counts["gpt2_decode_step"] > 10 and counts["linear_few_rows_bf16"] > 10
    hf = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.bfloat16().float())
        for i, p in enumerate(ps):
            tokens = out[str(i)]["tokens"][0]
            logits = hf(torch.tensor([p + tokens])).logits[0, len(p) - 1:-1].float()
            want = torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens)[:, None]).squeeze(1)
            got = torch.tensor([lp.logprob for lp in out[str(i)]["logprobs"][0]])
            torch.testing.assert_close(got, want, atol=0.05, rtol=0.02)
