"""The compiled-grammar cache is bounded by estimated bytes as well as by count: big specs evict sooner."""

from __future__ import annotations

from lmservice.serving.structured import GrammarCompiler, structured_spec, template_bytes


def test_the_byte_bound_evicts_least_recently_used_first(tiny_engine):
    engine = tiny_engine()
    specs = [structured_spec({"structured_outputs": {"regex": f"{c}+"}}) for c in "abc"]
    compiler = GrammarCompiler(engine.tokenizer, engine.vocab_size, cache_size=100,
                               max_cache_bytes=2 * template_bytes(specs[0]))
    for spec in specs:
        compiler.compile(spec)
    assert compiler.num_compiled == 3 and compiler.cache_bytes == 2 * template_bytes(specs[0])
    compiler.compile(specs[2])  # still cached
    assert compiler.num_compiled == 3
    compiler.compile(specs[0])  # the oldest went for the byte bound: compiled again
    assert compiler.num_compiled == 4
    big = structured_spec({"structured_outputs": {"regex": "(" + "|".join(f"w{i}" for i in range(2000)) + ")"}})
    compiler.compile(big)  # over the whole budget alone: kept, the others make room
    assert compiler.cache_bytes == template_bytes(big) and compiler.num_compiled == 5
