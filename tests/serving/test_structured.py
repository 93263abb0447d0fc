"""Structured output through the engine (lmservice/serving/structured.py + lmservice/engine/grammar.py): on a
random-weight model only the grammar can make the output valid, so validity over many seeds is the test;
constrained rows mixed with free ones leave those unchanged; a seeded constrained row is the same alone
or in a batch; bad specs are refused when compiled."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from lmservice.engine.outputs import RequestRejectedError
from lmservice.engine.sampling_params import SamplingParams
from lmservice.serving.structured import GrammarCompiler, StructuredSpec, structured_spec
from tests.helpers import run_to_completion

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3},
        "home": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6}},
                 "required": ["city"], "additionalProperties": False},
    },
    "required": ["name", "age", "pets", "home"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def compiler_for():
    compilers = {}

    def get(engine):
        return compilers.setdefault(id(engine.tokenizer), GrammarCompiler(engine.tokenizer, engine.vocab_size))

    return get


def _run(engine, template, params_list, prompt=(1, 2, 3)):
    requests = [(str(i), list(prompt), p) for i, p in enumerate(params_list)]
    for rid, ids, params in requests:
        engine.submit(rid, ids, params, grammar=template)
    out = {}
    while engine.has_unfinished():
        for o in engine.step():
            r = out.setdefault(o.request_id, {"text": "", "finish": None, "error": None})
            r["text"] += "".join(c.text for c in o.outputs)
            r["finish"] = next((c.finish_reason for c in o.outputs if c.finish_reason), r["finish"])
            r["error"] = o.error
    return [out[str(i)] for i in range(len(params_list))]


def test_a_nested_json_schema_holds_on_random_weights_for_every_seed(tiny_engine, compiler_for):
    engine = tiny_engine()
    template = compiler_for(engine).compile(structured_spec({"response_format": {
        "type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}}))
    params = [SamplingParams(temperature=0.0, max_tokens=120)] + [
        SamplingParams(temperature=1.0, seed=s, max_tokens=120) for s in range(8)]
    for result in _run(engine, template, params):
        assert result["error"] is None and result["finish"] == "stop", result
        jsonschema.validate(json.loads(result["text"]), SCHEMA)
    assert engine.pool.num_used_blocks == 0


def test_choice_regex_and_grammar(tiny_engine, compiler_for):
    engine = tiny_engine()
    compile_ = compiler_for(engine).compile
    choices = ["positive", "negative", "neutral"]
    seeded = [SamplingParams(temperature=1.0, seed=s, max_tokens=40) for s in range(6)]
    for r in _run(engine, compile_(structured_spec({"structured_outputs": {"choice": choices}})), seeded):
        assert r["text"] in choices and r["finish"] == "stop"
    for r in _run(engine, compile_(structured_spec({"structured_outputs": {"regex": r"[0-9]{3}-[0-9]{4}"}})), seeded):
        assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", r["text"]) and r["finish"] == "stop"
    lark = 'start: "(" expr ")"\nexpr: NUMBER ("+" NUMBER)*\nNUMBER: /[0-9]{1,3}/'
    for r in _run(engine, compile_(structured_spec({"structured_outputs": {"grammar": lark}})), seeded):
        assert re.fullmatch(r"\([0-9]{1,3}(\+[0-9]{1,3})*\)", r["text"]), r


def test_constrained_rows_beside_free_rows_change_nothing_and_seeds_hold(tiny_engine, compiler_for):
    engine = tiny_engine()
    template = compiler_for(engine).compile(StructuredSpec("json", json.dumps(SCHEMA), "structured_outputs"))
    free = SamplingParams(temperature=0.9, seed=3, max_tokens=12, ignore_eos=True)
    constrained = SamplingParams(temperature=0.9, seed=5, max_tokens=120)
    free_alone = run_to_completion(tiny_engine(), [("f", [4, 5, 6], free)])["f"]["tokens"][0]
    constrained_alone = _run(tiny_engine(), template, [constrained])[0]["text"]
    engine.submit("f", [4, 5, 6], free)
    for i in range(3):
        engine.submit(f"c{i}", [1, 2, 3], constrained, grammar=template)
    tokens, texts = [], {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.request_id == "f":
                tokens += [t for c in o.outputs for t in c.token_ids]
            else:
                texts[o.request_id] = texts.get(o.request_id, "") + "".join(c.text for c in o.outputs)
    assert tokens == free_alone
    assert set(texts.values()) == {constrained_alone}


@pytest.mark.parametrize("fields, match", [
    ({"structured_outputs": {"json": {"type": "string", "minLength": 5, "maxLength": 2}}}, "nsatisfiable"),
    ({"structured_outputs": {"json": {"type": "object", "properties": {"a": {"type": "string"}},
                                      "required": ["a"], "additionalProperties": False,
                                      "not": {"required": ["a"]}}}}, "invalid json"),
    ({"structured_outputs": {"regex": "([0-9]"}}, "invalid regex"),
    ({"structured_outputs": {"grammar": "start: ("}}, "invalid grammar"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "exactly one"),
    ({"structured_outputs": {"choice": []}}, "non-empty strings"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "JSON Schema object"),
    ({"response_format": {"type": "yaml"}}, "json_object or json_schema"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "cannot be combined"),
])
def test_bad_specs_are_refused_naming_the_field(tiny_engine, compiler_for, fields, match):
    compiler = compiler_for(tiny_engine())
    with pytest.raises(RequestRejectedError, match=match) as e:
        compiler.compile(structured_spec(fields))
    assert e.value.param in ("structured_outputs", "response_format")


def test_compiled_once_per_distinct_spec_and_size_bounded(tiny_engine):
    engine = tiny_engine()
    compiler = GrammarCompiler(engine.tokenizer, engine.vocab_size, cache_size=2, max_spec_bytes=200)
    a = structured_spec({"structured_outputs": {"regex": "a+"}})
    assert compiler.compile(a) is compiler.compile(structured_spec({"structured_outputs": {"regex": "a+"}}))
    compiler.compile(structured_spec({"structured_outputs": {"regex": "b+"}}))
    compiler.compile(structured_spec({"structured_outputs": {"regex": "c+"}}))
    assert compiler.num_compiled == 3
    compiler.compile(a)  # evicted by the LRU bound: compiled again
    assert compiler.num_compiled == 4
    with pytest.raises(RequestRejectedError, match="--max-structured-spec-bytes"):
        compiler.compile(structured_spec({"structured_outputs": {"choice": ["x" * 300]}}))
