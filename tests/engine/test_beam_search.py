"""Beam search: token parity with transformers' generate(num_beams=k, do_sample=False, ...) in fp32, the
beams' shared KV blocks, and other requests in the same batch unaffected."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel

from lmservice.engine.engine import Engine, EngineConfig
from lmservice.engine.sampling_params import SamplingParams
from lmservice.model.loader import load_model
from tests.helpers import make_gpt2_dir, prompts, run_to_completion

VOCAB = 1000
EOS_ID = VOCAB - 1  # the test tokenizer's EOS (tests/helpers.py)
MAX_NEW = 12

# (num_beams, length_penalty, early_stopping, n)
CASES = [
    (2, 1.0, False, 1),
    (2, 0.0, "never", 2),
    (3, 1.0, True, 3),
    (3, 0.5, False, 2),
    (4, 2.0, "never", 2),
    (4, -1.0, False, 4),
    (4, 1.0, True, 1),
    (5, 1.5, False, 3),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random GPT-2 whose EOS row of the (tied) embeddings is scaled up: EOS then wins or loses by wide
    margins depending on the context, so hypotheses end at EOS at many different lengths."""
    path = make_gpt2_dir(tmp_path_factory.mktemp("beam") / "model", seed=2, eos=True, vocab_size=VOCAB,
                         eos_token_id=EOS_ID, bos_token_id=EOS_ID)
    hf = GPT2LMHeadModel.from_pretrained(path)
    with torch.no_grad():
        hf.transformer.wte.weight[EOS_ID] *= 8
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return GPT2LMHeadModel.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model(model_dir, device="cpu", dtype="float32")


PROMPTS = prompts(5, VOCAB - 1, 2, 24, seed=1)


def hf_beams(hf, prompt: list[int], k: int, lp: float, es, n: int, max_new: int = MAX_NEW) -> list[list[int]]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                          num_beams=k, length_penalty=lp, early_stopping=es, num_return_sequences=n,
                          eos_token_id=EOS_ID, pad_token_id=EOS_ID)
    rows = []
    for row in out[:, len(prompt):].tolist():
        rows.append(row[:row.index(EOS_ID) + 1] if EOS_ID in row else row)  # EOS ends it, padding follows
    return rows


def beam_params(k: int, lp: float, es, n: int, max_new: int = MAX_NEW) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_new, num_beams=k, length_penalty=lp, early_stopping=es,
                          n=n)


@pytest.fixture(scope="module")
def expected(hf_model):
    return {case: [hf_beams(hf_model, p, *case) for p in PROMPTS] for case in CASES}


def test_reference_ends_at_eos(expected):
    """Negative control: the reference's hypotheses end at EOS early as well as run to max_new_tokens."""
    rows = [row for per_case in expected.values() for per_prompt in per_case for row in per_prompt]
    early = [row for row in rows if row[-1] == EOS_ID and len(row) < MAX_NEW]
    assert len(early) > len(rows) // 4 and len(early) < len(rows)
    assert len({len(row) for row in early}) >= 4


@pytest.mark.parametrize("case", CASES, ids=[f"k{k}-lp{lp}-es{es}-n{n}" for k, lp, es, n in CASES])
def test_parity_with_transformers(loaded, expected, case):
    engine = Engine(loaded, EngineConfig.from_fields(num_kv_blocks=256, block_size=4))
    results = run_to_completion(engine, [(f"r{i}", p, beam_params(*case)) for i, p in enumerate(PROMPTS)])
    for i, want in enumerate(expected[case]):
        got = results[f"r{i}"]
        assert [got["tokens"][j] for j in range(case[3])] == want, f"prompt {i}"
        assert [got["finish"][j][0] for j in range(case[3])] == [
            "stop" if row[-1] == EOS_ID else "length" for row in want]
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


ENGINE_VARIANTS = {
    "no-prefix-cache": dict(enable_prefix_caching=False),
    "block-size-1": dict(block_size=1, num_kv_blocks=1200),
    "block-size-16": dict(block_size=16, num_kv_blocks=64),
    # a token budget below the beams of one step: a beam's candidates wait for its siblings'
    "tight-budget": dict(max_num_batched_tokens=3, block_size=4),
    # too few blocks for all the searches at once: beam searches are preempted whole and start again
    "preempting": dict(num_kv_blocks=24, block_size=4),
    # beams never carry guesses; other rows may
    "speculative": dict(speculative="ngram", speculative_disable_batch_size=64),
}


@pytest.mark.parametrize("variant", list(ENGINE_VARIANTS))
def test_parity_under_engine_variants(loaded, expected, variant):
    case = (4, 2.0, "never", 2)
    kwargs = dict(num_kv_blocks=256, block_size=4)
    kwargs.update(ENGINE_VARIANTS[variant])
    engine = Engine(loaded, EngineConfig.from_fields(**kwargs))
    results = run_to_completion(engine, [(f"r{i}", p, beam_params(*case)) for i, p in enumerate(PROMPTS)],
                                stagger=2)
    for i, want in enumerate(expected[case]):
        assert [results[f"r{i}"]["tokens"][j] for j in range(2)] == want, f"prompt {i}"
    if variant == "preempting":
        assert engine.scheduler.num_preemptions > 0
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


def test_greedy_requests_beside_beams_unchanged(loaded, expected):
    """Greedy and seeded sampled requests give the same tokens alone and in a batch with beam searches."""
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    sampled = SamplingParams(temperature=0.9, max_tokens=10, seed=7, ignore_eos=True)
    others = [(f"g{i}", p, greedy if i % 2 else sampled) for i, p in enumerate(prompts(4, VOCAB - 1, 3, 30, seed=5))]
    alone = run_to_completion(Engine(loaded, EngineConfig.from_fields(num_kv_blocks=256, block_size=4)), others)
    case = (3, 0.5, False, 2)
    beams = [(f"r{i}", p, beam_params(*case)) for i, p in enumerate(PROMPTS)]
    mixed_requests = [r for pair in zip(beams, others, strict=False) for r in pair] + beams[len(others):]
    mixed = run_to_completion(Engine(loaded, EngineConfig.from_fields(num_kv_blocks=256, block_size=4)),
                              mixed_requests, stagger=2)
    for rid, *_ in others:
        assert mixed[rid]["tokens"] == alone[rid]["tokens"], rid
    for i, want in enumerate(expected[case]):
        assert [mixed[f"r{i}"]["tokens"][j] for j in range(2)] == want


def _refs(engine) -> list[int]:
    return [b.ref_count for b in engine.pool.blocks]


def test_beams_share_blocks_and_free_them(loaded):
    """While the search runs the beams hold fewer blocks than k copies would, the prompt's blocks are held
    by every beam, and every block is free when it ends."""
    block_size, k = 4, 4
    engine = Engine(loaded, EngineConfig.from_fields(num_kv_blocks=256, block_size=block_size))
    prompt = prompts(1, VOCAB - 1, 21, 21, seed=9)[0]  # 5 full blocks and one partly filled
    params = SamplingParams(temperature=0.0, max_tokens=10, num_beams=k, ignore_eos=True)
    engine.submit("r", prompt, params)
    max_shared = 0
    while engine.has_unfinished():
        engine.step()
        group = engine.groups.get("r")
        if group is None or len(group.seqs) < k:
            continue
        beams = group.seqs
        for block_id in beams[0].block_ids[:len(prompt) // block_size]:  # the prompt's full blocks
            assert engine.pool.blocks[block_id].ref_count == k
        per_beam = max(len(seq.block_ids) for seq in beams)
        used = engine.pool.num_used_blocks
        assert used == len({b for seq in beams for b in seq.block_ids})
        assert used < k * per_beam
        max_shared = max(max_shared, k * per_beam - used)
    assert max_shared >= len(prompt) // block_size * (k - 1)
    assert engine.pool.num_free_blocks == engine.pool.num_blocks and not any(_refs(engine))


def test_abort_frees_every_block(loaded):
    engine = Engine(loaded, EngineConfig.from_fields(num_kv_blocks=256, block_size=4))
    engine.submit("r", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=30, num_beams=4, n=2, ignore_eos=True))
    for _ in range(6):
        engine.step()
    assert len(engine.groups["r"].seqs) == 4 and engine.pool.num_used_blocks > 0
    out = engine.abort("r")
    assert out.finished and [(d.index, d.finish_reason, d.token_ids) for d in out.outputs] == [
        (0, "abort", []), (1, "abort", [])]
    assert not engine.has_unfinished()
    assert engine.pool.num_free_blocks == engine.pool.num_blocks and not any(_refs(engine))


def test_ignore_eos_runs_to_max_tokens(loaded, hf_model):
    """ignore_eos: EOS is a token like any other (transformers with no eos_token_id)."""
    prompt = PROMPTS[2]
    engine = Engine(loaded, EngineConfig.from_fields(num_kv_blocks=256, block_size=4))
    params = SamplingParams(temperature=0.0, max_tokens=8, num_beams=3, n=3, ignore_eos=True)
    results = run_to_completion(engine, [("r", prompt, params)])
    ids = torch.tensor([prompt])
    with torch.no_grad():
        hf_model.generation_config.eos_token_id = None
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                num_beams=3, num_return_sequences=3, eos_token_id=None, pad_token_id=0)
        hf_model.generation_config.eos_token_id = EOS_ID
    assert [results["r"]["tokens"][j] for j in range(3)] == out[:, len(prompt):].tolist()
    assert all(results["r"]["finish"][j][0] == "length" for j in range(3))


def test_text_is_the_whole_hypothesis(loaded, expected):
    """The result comes in one event at the end, each hypothesis's text decoded whole (EOS not shown)."""
    case = (3, 1.0, True, 3)
    engine = Engine(loaded, EngineConfig.from_fields(num_kv_blocks=256, block_size=4))
    results = run_to_completion(engine, [("r", PROMPTS[0], beam_params(*case))])
    events = [e for e in results["r"]["events"] if e.outputs]
    assert len(events) == 1 and events[0].finished
    tok = loaded.tokenizer
    for j, row in enumerate(expected[case][0]):
        assert results["r"]["text"][j] == tok.decode(row, skip_special_tokens=True)
    assert events[0].num_generated_tokens == sum(len(row) for row in expected[case][0])


def test_validator_bounds_a_beam_search(loaded):
    """The KV cache must hold every beam at once (the prompt's full blocks counted once), and a search runs all
    its beams in one step."""
    from lmservice.engine.outputs import RequestRejectedError

    engine = Engine(loaded, EngineConfig.from_fields(num_kv_blocks=20, block_size=4, max_num_seqs=4))
    prompt = list(range(10, 26))  # 4 full blocks
    params = SamplingParams(temperature=0.0, max_tokens=12, num_beams=4)  # 4 + 4 * 3 = 16 blocks
    assert engine.validator.check("a", prompt, params).num_seqs == 1
    with pytest.raises(RequestRejectedError) as e:
        engine.validator.check("b", prompt, SamplingParams(temperature=0.0, max_tokens=20, num_beams=4))
    assert e.value.param == "max_tokens"
    with pytest.raises(RequestRejectedError) as e:
        engine.validator.check("c", prompt, SamplingParams(temperature=0.0, max_tokens=4, num_beams=5))
    assert e.value.param == "num_beams"
    with pytest.raises(RequestRejectedError) as e:
        engine.validator.check("d", prompt, params, grammar=object())
    assert e.value.param == "structured_outputs"
