"""Speculative decoding: exact (greedy and seeded output equal to decoding without it, sampled output from the
model's distribution), composable with every other kind of row, and leaving the KV cache as it found it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel

from lmservice.engine.block_pool import hash_block
from lmservice.engine.sampling_params import SamplingParams
from lmservice.engine.speculative import SpeculativeConfig, accept, ngram_propose
from lmservice.serving.structured import GrammarCompiler, StructuredSpec
from tests.helpers import make_gpt2_dir, prompts, run_to_completion

NGRAM = dict(speculative="ngram", num_speculative_tokens=4, speculative_ngram_min=1, speculative_disable_batch_size=64)


def tokens_of(results) -> dict[str, dict[int, list[int]]]:
    return {rid: r["tokens"] for rid, r in results.items()}


def test_ngram_lookup_prefers_the_longest_latest_match():
    seq = np.array([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3])
    # "2 3" occurs at 1 and 5; "5 2 3" nowhere earlier; latest "2 3" is followed by 7 8 5
    assert ngram_propose(seq, 3, 1, 3) == [7, 8, 5]
    assert ngram_propose(seq, 10, 1, 3) == [7, 8, 5, 2, 3]  # runs to the end of the sequence
    assert ngram_propose(np.array([4, 5, 6]), 3, 1, 3) == []
    assert ngram_propose(np.array([1, 2, 3, 9, 1, 2, 3]), 2, 3, 3) == [9, 1]  # "1 2 3" at 0
    assert ngram_propose(np.array([5, 5]), 2, 1, 2) == [5]


def test_accept_keeps_guesses_up_to_the_first_disagreement():
    assert accept([1, 2, 3], [1, 2, 3, 4]) == [1, 2, 3, 4]  # all kept, plus the bonus token
    assert accept([1, 2, 3], [1, 5, 3, 4]) == [1, 5]
    assert accept([1, 2, 3], [6, 2, 3, 4]) == [6]


def test_config_parsing():
    assert SpeculativeConfig.parse(None) is None and SpeculativeConfig.parse("off") is None
    assert SpeculativeConfig.parse("draft:/x").draft_model == "/x"
    for bad in ("ngram:3", "draft", "eagle"):
        with pytest.raises(ValueError, match="--speculative"):
            SpeculativeConfig.parse(bad)
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpeculativeConfig.parse("ngram", num_speculative_tokens=0)


def _repetitive(num: int, seed: int) -> list[list[int]]:
    """Prompts that repeat a phrase, so n-gram lookup finds guesses (random weights loop too)."""
    out = []
    for i, p in enumerate(prompts(num, 1000, 3, 8, seed=seed)):
        out.append((p * (2 + i % 3))[:40])
    return out


def _check_speculated(engine) -> None:
    stats = engine.stats().spec
    assert stats.num_drafts > 0 and stats.num_draft_tokens > 0
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens  # some kept, some rejected: both paths ran


def test_greedy_equals_plain_alone_and_in_mixed_batches(tiny_engine):
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    reqs = [(f"g{i}", p, greedy) for i, p in enumerate(_repetitive(6, seed=1))]
    plain = tokens_of(run_to_completion(tiny_engine(), reqs))
    alone = tiny_engine(**NGRAM)
    for rid, prompt, params in reqs:
        assert run_to_completion(alone, [(rid, prompt, params)])[rid]["tokens"] == plain[rid]
    _check_speculated(alone)
    # beside rows with penalties, seeded sampling and n > 1, staggered arrivals
    others = [("pen", [3, 4, 5, 3, 4, 5], SamplingParams(temperature=0.0, max_tokens=20, repetition_penalty=1.3,
                                                          frequency_penalty=0.5, ignore_eos=True)),
              ("smp", [7, 8, 7, 8], SamplingParams(temperature=0.8, top_k=20, seed=3, max_tokens=20, ignore_eos=True)),
              ("nn", [9, 9, 9], SamplingParams(temperature=0.0, n=3, max_tokens=15, ignore_eos=True))]
    mixed_plain = tokens_of(run_to_completion(tiny_engine(), reqs + others, stagger=2))
    engine = tiny_engine(**NGRAM)
    mixed = tokens_of(run_to_completion(engine, others[:1] + reqs + others[1:], stagger=2))
    assert mixed == mixed_plain
    _check_speculated(engine)


def test_seeded_sampling_and_penalties_equal_plain(tiny_engine):
    """A seeded sequence consumes its generator once per emitted token, so it draws the same tokens with
    speculation on; penalties and min_tokens see each position's own history."""
    reqs = [(f"s{i}", p, SamplingParams(temperature=0.3, top_k=3, top_p=0.9, seed=100 + i, max_tokens=30, min_tokens=5,
                                         presence_penalty=0.3 * (i % 2), ignore_eos=True))
            for i, p in enumerate(_repetitive(5, seed=2))]
    plain = tokens_of(run_to_completion(tiny_engine(), reqs))
    engine = tiny_engine(**NGRAM)
    assert tokens_of(run_to_completion(engine, reqs, stagger=1)) == plain
    _check_speculated(engine)  # some guesses rejected: the generators were rewound


def test_stops_and_limits_never_overshoot(tiny_engine):
    plain_engine = tiny_engine()
    base = run_to_completion(plain_engine, [("a", [5, 6, 5, 6, 5, 6], SamplingParams(temperature=0.0, max_tokens=30,
                                                                                      ignore_eos=True))])["a"]
    tokens, text = base["tokens"][0], base["text"][0]
    stop_at = tokens[9]
    cases = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (1, 2, 3, 7, 13)]
    cases.append(SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[stop_at], ignore_eos=True))
    cases.append(SamplingParams(temperature=0.0, max_tokens=30, stop=[text[15:18]], ignore_eos=True))
    for params in cases:
        want = run_to_completion(tiny_engine(), [("a", [5, 6, 5, 6, 5, 6], params)])["a"]
        got = run_to_completion(tiny_engine(**NGRAM), [("a", [5, 6, 5, 6, 5, 6], params)])["a"]
        assert (got["tokens"], got["text"], got["finish"]) == (want["tokens"], want["text"], want["finish"])
    # the context limit: a sequence running into n_positions stops exactly there
    long_prompt = ([5, 6, 7] * 50)[:120]
    params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
    want = run_to_completion(tiny_engine(), [("a", long_prompt, params)])["a"]
    got = run_to_completion(tiny_engine(**NGRAM), [("a", long_prompt, params)])["a"]
    assert got["tokens"] == want["tokens"] and len(long_prompt) + len(got["tokens"][0]) == 128


def test_logprobs_are_the_models(tiny_engine):
    params = SamplingParams(temperature=0.0, max_tokens=20, logprobs=3, ignore_eos=True)
    prompt = [11, 12, 13, 11, 12, 13, 11, 12]
    want = run_to_completion(tiny_engine(), [("a", prompt, params)])["a"]["logprobs"][0]
    engine = tiny_engine(**NGRAM)
    got = run_to_completion(engine, [("a", prompt, params)])["a"]["logprobs"][0]
    assert engine.stats().spec.num_accepted_tokens > 0
    assert [lp.token_id for lp in got] == [lp.token_id for lp in want]
    for g, w in zip(got, want, strict=True):
        assert g.logprob == pytest.approx(w.logprob, abs=1e-4)
        assert [t for t, _ in g.top] == [t for t, _ in w.top]


def test_structured_and_adapter_rows(tiny_engine, tiny_model_dir, tmp_path):
    """A structured row never speculates (its grammar checks one token at a time) and an adapter row
    speculates with n-gram guesses; both, and the plain rows beside them, give what they give alone."""
    from tests.servers import make_adapter

    adapter_dir = make_adapter(tiny_model_dir, tmp_path / "ad", classifier=False, seed=4)

    def run(**kwargs):
        engine = tiny_engine(**kwargs)
        engine.add_adapter("ad", adapter_dir)
        compiler = GrammarCompiler(engine.tokenizer, engine.vocab_size)
        grammar = compiler.compile(StructuredSpec("regex", "(ab|cd){3,12}", "structured_outputs.regex"))
        greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
        engine.submit("st", [1, 2, 1, 2], SamplingParams(temperature=0.0, max_tokens=20), grammar=grammar)
        engine.submit("ad", [4, 5, 4, 5, 4, 5], greedy, adapter="ad")
        engine.submit("p", [8, 9, 8, 9, 8], greedy)
        tokens: dict[str, list[int]] = {}
        while engine.has_unfinished():
            for out in engine.step():
                assert out.error is None
                tokens.setdefault(out.request_id, []).extend(t for c in out.outputs for t in c.token_ids)
        return tokens, engine

    plain, _ = run()
    spec, engine = run(**NGRAM)
    assert spec == plain
    text = engine.tokenizer.decode(spec["st"])
    assert len(text) >= 6 and set(text) <= set("abcd")
    assert engine.stats().spec.num_drafts > 0


def test_prefix_cache_preemption_and_block_accounting(tiny_engine):
    """Few KV blocks: sequences preempt each other and share prompt prefixes. Output equals plain decoding;
    blocks holding rejected guesses go back at once; only blocks of real tokens are ever published."""
    shared = [21, 22, 23, 24] * 5
    reqs = [(f"r{i}", shared + p, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
            for i, p in enumerate(_repetitive(8, seed=3))]
    plain_engine = tiny_engine(num_kv_blocks=24, block_size=4)
    plain = run_to_completion(plain_engine, reqs, stagger=2)
    assert plain_engine.stats().num_preemptions > 0
    engine = tiny_engine(num_kv_blocks=24, block_size=4, **NGRAM)
    pool = engine.pool
    real_hashes: set[int] = set()
    seen_trimmed = []

    original_trim = engine.scheduler.kv.trim

    def checked_trim(seq):
        original_trim(seq)
        seen_trimmed.append(len(seq.block_ids))
        # no block past the sequence's tokens (its pending one included), none missing for the computed ones
        assert -(-seq.num_computed_tokens // 4) <= len(seq.block_ids) <= -(-seq.num_tokens // 4)

    engine.scheduler.kv.trim = checked_trim
    spec = run_to_completion(engine, reqs, stagger=2)
    assert tokens_of(spec) == tokens_of(plain)
    assert engine.stats().num_preemptions > 0 and seen_trimmed
    _check_speculated(engine)
    assert pool.num_used_blocks == 0 and all(b.ref_count == 0 for b in pool.blocks)
    for rid, prompt, _ in reqs:
        tokens = prompt + spec[rid]["tokens"][0]
        parent = None
        for i in range(len(tokens) // 4):
            parent = hash_block(parent, tuple(tokens[4 * i:4 * i + 4]), None)
            real_hashes.add(parent)
    assert pool.cached and set(pool.cached) <= real_hashes


def test_switches_off_above_the_batch_size(tiny_engine):
    engine = tiny_engine(**{**NGRAM, "speculative_disable_batch_size": 2})
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    run_to_completion(engine, [(f"a{i}", [5, 6, 5, 6, 5, 6], greedy) for i in range(3)])
    assert engine.stats().spec.num_drafts == 0
    run_to_completion(engine, [(f"b{i}", [5, 6, 5, 6, 5, 6], greedy) for i in range(2)])
    assert engine.stats().spec.num_drafts > 0


def _chi2_sf(x: float, df: int) -> float:
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(x / 2, dtype=torch.float64)))


@pytest.mark.parametrize("spec", ["off", "ngram"])
def test_sampled_output_follows_the_models_distribution(tmp_path, spec):
    """Chi-square of the (2nd, 3rd) output tokens, both produced by verification steps, against the exact
    distribution the model gives (computed with transformers). A logit bias puts most of the mass on six
    tokens, so the joint has few cells that matter and the prompt's n-grams are often right. "off" is the
    control that the expected distribution is computed right."""
    from lmservice.engine.engine import Engine, EngineConfig
    from lmservice.model.loader import load_model

    vocab = 300
    model_dir = make_gpt2_dir(tmp_path / "m", seed=7, vocab_size=vocab, n_positions=32, n_embd=32, n_layer=1, n_head=2,
                              initializer_range=0.2)  # peakier than GPT-2's 0.02: a distribution worth testing
    bias = dict.fromkeys(range(1, 7), 6.0)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    n = 128
    params = SamplingParams(n=n, temperature=1.0, max_tokens=3, ignore_eos=True, logit_bias=bias)
    engine = Engine(load_model(model_dir, device="cpu", dtype="float32"),
                    EngineConfig.from_fields(num_kv_blocks=4096, block_size=4, max_num_seqs=n, max_n=n,
                                             speculative=spec, num_speculative_tokens=2, speculative_ngram_min=1,
                                             speculative_disable_batch_size=n))
    observed: dict[tuple[int, int], int] = {}
    for r in range(24):
        out = run_to_completion(engine, [(f"r{r}", prompt, params)])[f"r{r}"]["tokens"]
        for toks in out.values():
            observed[toks[1], toks[2]] = observed.get((toks[1], toks[2]), 0) + 1
    stats = engine.stats().spec
    assert spec == "off" or (stats.num_accepted_tokens > 300 and stats.num_draft_tokens > stats.num_accepted_tokens)

    hf = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    shift = torch.zeros(vocab)
    shift[list(bias)] = 6.0

    def probs(rows: list[list[int]]) -> torch.Tensor:
        with torch.no_grad():
            return (hf(torch.tensor(rows)).logits[:, -1].double() + shift).softmax(-1)

    p1 = probs([prompt])[0]
    p2 = probs([prompt + [a] for a in range(vocab)])  # (t1, t2)
    joint = torch.zeros(vocab, vocab, dtype=torch.float64)  # P(t2, t3), marginal over t1
    for a in range(vocab):
        p3 = probs([prompt + [a, b] for b in range(vocab)])  # (t2, t3)
        joint += p1[a] * p2[a][:, None] * p3
    total = sum(observed.values())
    expected = joint * total
    cells = [(b, c) for b in range(vocab) for c in range(vocab) if expected[b, c] >= 5]
    obs = [observed.get(cell, 0) for cell in cells]
    exp = [float(expected[cell]) for cell in cells]
    obs.append(total - sum(obs))
    exp.append(total - sum(exp))
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp, strict=True))
    p_value = _chi2_sf(stat, len(obs) - 1)
    assert len(cells) >= 10
    assert p_value > 1e-3, (stat, len(obs), p_value)


def test_draft_model_greedy_equals_plain(tiny_engine, tiny_model_dir, tmp_path):
    """A draft model: the base itself as its own draft (its KV cache kept in step through every kind of step,
    so nearly every guess is right), and a different small random draft (most guesses wrong); both give the
    plain output, alone and beside adapter and sampled rows, across preemptions."""
    greedy = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    reqs = [(f"g{i}", p, greedy) for i, p in enumerate(prompts(6, 1000, 5, 30, seed=9))]
    reqs.append(("n2", [3, 1, 4, 1, 5], SamplingParams(temperature=0.0, n=2, max_tokens=20, ignore_eos=True)))
    reqs.append(("smp", [2, 7, 1, 8], SamplingParams(temperature=0.9, seed=5, max_tokens=25, ignore_eos=True)))
    small = {"num_kv_blocks": 40, "block_size": 4}
    plain = tiny_engine(**small)
    want = tokens_of(run_to_completion(plain, reqs, stagger=2))
    assert plain.stats().num_preemptions > 0

    same = tiny_engine(**small, speculative=f"draft:{tiny_model_dir}", num_speculative_tokens=3,
                       speculative_disable_batch_size=64)
    assert tokens_of(run_to_completion(same, reqs, stagger=2)) == want
    assert same.stats().spec.num_accepted_tokens > 0
    # greedy rows alone: the base guessing for itself is right nearly always (its KV cache was kept in step)
    same = tiny_engine(**small, speculative=f"draft:{tiny_model_dir}", num_speculative_tokens=3,
                       speculative_disable_batch_size=64)
    assert tokens_of(run_to_completion(same, reqs[:-1], stagger=2)) == {k: v for k, v in want.items() if k != "smp"}
    stats = same.stats().spec
    assert stats.num_draft_tokens > 100 and stats.num_accepted_tokens > 0.95 * stats.num_draft_tokens

    # chunked prefills (a 16-token budget) and prompts sharing prefixes found in the prefix cache: the
    # draft's blocks mirror the base's there too, so its guesses stay right
    shared = prompts(1, 1000, 24, 24, seed=12)[0]
    chunked = [(f"c{i}", shared + p, greedy) for i, p in enumerate(prompts(4, 1000, 3, 9, seed=13))]
    want_chunked = tokens_of(run_to_completion(tiny_engine(max_num_batched_tokens=16), chunked, stagger=1))
    same = tiny_engine(max_num_batched_tokens=16, speculative=f"draft:{tiny_model_dir}", num_speculative_tokens=3,
                       speculative_disable_batch_size=64)
    assert tokens_of(run_to_completion(same, chunked, stagger=1)) == want_chunked
    stats = same.stats()
    assert stats.prefix_cache_hits > 0 and stats.spec.num_accepted_tokens > 0.95 * stats.spec.num_draft_tokens

    other_dir = make_gpt2_dir(tmp_path / "draft", seed=11, n_layer=1, n_embd=32, n_head=2)
    other = tiny_engine(**small, speculative=f"draft:{other_dir}", num_speculative_tokens=3,
                        speculative_disable_batch_size=64)
    assert tokens_of(run_to_completion(other, reqs, stagger=2)) == want
    stats = other.stats().spec
    assert stats.num_draft_tokens > 100 and stats.num_accepted_tokens < 0.5 * stats.num_draft_tokens
    assert other.pool.num_used_blocks == 0


def test_draft_model_must_match_the_base(tiny_engine, tmp_path):
    short = make_gpt2_dir(tmp_path / "short", seed=1, n_positions=64)
    with pytest.raises(ValueError, match="n_positions"):
        tiny_engine(speculative=f"draft:{short}")
    other_vocab = make_gpt2_dir(tmp_path / "vocab", seed=1, vocab_size=900)
    with pytest.raises(ValueError, match="tokenizer|vocab_size"):
        tiny_engine(speculative=f"draft:{other_vocab}")


def test_beam_search_beside_speculating_rows(tiny_engine):
    """A beam search in a speculating engine: its beams never guess, and both it and the greedy rows beside
    it give what they give without speculation."""
    beam = SamplingParams(temperature=0.0, num_beams=3, n=2, max_tokens=12, ignore_eos=True)
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    reqs = [("beam", [5, 6, 7, 5, 6], beam)] + [(f"g{i}", p, greedy) for i, p in enumerate(_repetitive(2, seed=4))]
    want = tokens_of(run_to_completion(tiny_engine(), reqs))
    engine = tiny_engine(**NGRAM)
    assert tokens_of(run_to_completion(engine, reqs)) == want
    assert engine.stats().spec.num_accepted_tokens > 0
    assert engine.pool.num_used_blocks == 0


def test_guesses_never_cost_another_sequence_its_step():
    """Guesses get blocks only after every running sequence has its own token's: with one block free, a
    sequence needing it for its next token gets it, and the one whose guesses would have taken it decodes
    plainly (nobody is preempted)."""
    from lmservice.engine.block_pool import BlockPool
    from lmservice.engine.kv_cache_manager import KVCacheManager
    from lmservice.engine.request import Sequence, Status
    from lmservice.engine.scheduler import Scheduler, SchedulerConfig

    kv = KVCacheManager(BlockPool(6, 4))
    scheduler = Scheduler(SchedulerConfig(), kv)
    params = SamplingParams(temperature=0.0, max_tokens=50)
    a = Sequence("a#0", "a", 0, list(range(1, 8)), params, max_tokens=50, output_token_ids=[9])
    b = Sequence("b#0", "b", 0, list(range(1, 13)), params, max_tokens=50, output_token_ids=[9])
    for seq in (a, b):  # computed up to their pending token
        assert kv.allocate_slots(seq, seq.num_tokens - 1)
        seq.num_computed_tokens = seq.num_tokens - 1
        seq.status = Status.RUNNING
        scheduler.running.append(seq)
    assert kv.pool.num_free_blocks == 1
    a.spec_token_ids = [5, 6, 7]  # a's pending token fits its last block; its guesses would need the free one
    out = scheduler.schedule()
    assert not out.preempted
    assert {(s.seq.seq_id, s.num_new_tokens, tuple(s.spec_token_ids)) for s in out.scheduled} == {
        ("a#0", 1, ()), ("b#0", 1, ())}
    assert len(b.block_ids) == 4 and len(a.block_ids) == 2


def test_a_failure_past_the_first_rejected_guess_fails_nobody(tiny_engine):
    """Positions after a rejected guess are never emitted: non-finite logits there must not fail the request."""
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    want = run_to_completion(tiny_engine(), [("a", [3, 4, 5], params)])["a"]["tokens"]
    engine = tiny_engine(**NGRAM)
    engine.speculator.proposer.propose = lambda seqs, budget: [[999] * k for k in budget]  # always wrong
    compute_logits = engine.runner.model.compute_logits

    def poisoned(hidden):
        logits = compute_logits(hidden)
        if hidden.shape[0] > 1:  # a guessing step: its last position (after every guess) is never reached
            logits[-1] = float("nan")
        return logits

    engine.runner.model.compute_logits = poisoned
    got = run_to_completion(engine, [("a", [3, 4, 5], params)])["a"]
    assert got["tokens"] == want and got["finish"][0] == ("length", None)
    stats = engine.stats().spec
    assert stats.num_drafts > 0 and stats.num_accepted_tokens == 0
