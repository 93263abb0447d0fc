"""Structured output: request fields -> a grammar, compiled once per distinct spec (llguidance), cached.

Requests say what their output must be in OpenAI's `response_format` (json_object, json_schema) or vLLM's
`structured_outputs` (exactly one of json, regex, choice, grammar). Each distinct spec is compiled once
into an llguidance matcher template, kept in a bounded LRU; the engine gives every sequence its own copy
(lmservice/engine/grammar.py masks its logits each step). Compiling runs in a worker thread (llguidance
releases the GIL), so a large schema never stalls the event loop or the engine.

Why llguidance (measured against xgrammar 0.2.9 and outlines-core 0.2.14 on this project's tokenizer,
docs/benchmarks.md): it refuses invalid and unsatisfiable schemas when they are compiled, names the
JSON-Schema keywords it does not implement instead of ignoring them, and never produced invalid JSON in
the tests; xgrammar was 3-14x faster to fill a mask but let raw control characters into JSON strings and
silently dropped `allOf`; outlines-core has no grammars and ignores integer bounds.

JSON is generated compact (no optional whitespace): a model with weak weights otherwise fills the
output with whitespace runs.

A spec is the client's own input, so every way it can fail is the client's error (400), never a 500:
text nested too deeply to parse, a spec llguidance refuses, and one that compiles but breaks the parser's
limits once decoding starts (a `$ref` cycle every value must follow; a grammar whose rules double). The
last kind is looked for at compile time by walking the first tokens of one output (`PROBE_TOKENS`); one that
fails later fails its request while it runs, and `decoding_failure` turns the engine's report of it into
the same short 400 (mid-stream: an error event). Errors are llguidance's first line only: its parser
state dump is never shown (`verbose_errors=False`).
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from lmservice.engine.outputs import RequestRejectedError

KINDS = ("json", "regex", "choice", "grammar")
JSON_OPTIONS = {"whitespace_flexible": False}
# Tokens of one output walked at compile time: failures that llguidance only reports while decoding
# (its parser limits) mostly show in the first few.
PROBE_TOKENS = 8
# NOTE: lmservice/engine/engine.py reports a matcher that refuses a token (it allowed it in the mask, so only
# the matcher's own failure can cause this) as "RuntimeError: the grammar refused token N: <error>".
_REFUSED = re.compile(r"^RuntimeError: the grammar refused token \d+: (?P<cause>[^\n]*)")


@dataclass(frozen=True)
class StructuredSpec:
    """What a request's output must match. `value` is canonical text: the cache key."""

    kind: str  # json | regex | choice | grammar
    value: str
    param: str  # the request field it came from (named in errors)


def _first_line(error: str) -> str:
    return error.strip().split("\n", 1)[0][:300]


def decoding_failure(spec: StructuredSpec, engine_error: str) -> RequestRejectedError | None:
    """The 400 for a request whose grammar failed while decoding (from the engine's error text), or None
    when the engine failed it for another reason."""
    match = _REFUSED.match(engine_error)
    if match is None:
        return None
    return RequestRejectedError(f"{spec.param}: the {spec.kind} spec failed while generating: "
                                f"{_first_line(match['cause'])}", spec.param)


def structured_spec(values: dict[str, Any]) -> StructuredSpec | None:
    """From a request's `response_format` / `structured_outputs` (None: unconstrained). 400 for a
    malformed field, or for both at once."""
    response_format, structured = values.get("response_format"), values.get("structured_outputs")
    if response_format is not None and structured is not None:
        raise RequestRejectedError("response_format and structured_outputs cannot be combined", "response_format")
    if response_format is not None:
        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return StructuredSpec("json", json.dumps({"type": "object"}), "response_format")
        if kind == "json_schema":
            inner = response_format.get("json_schema")
            if not isinstance(inner, dict) or not isinstance(inner.get("schema"), dict):
                raise RequestRejectedError("response_format.json_schema.schema: must be a JSON Schema object",
                                           "response_format")
            return StructuredSpec("json", _canonical(inner["schema"], "response_format"), "response_format")
        raise RequestRejectedError(f"response_format.type: must be text, json_object or json_schema, got {kind!r}",
                                   "response_format")
    if structured is None:
        return None
    given = [k for k in KINDS if structured.get(k) is not None]
    unknown = set(structured) - set(KINDS)
    if len(given) != 1 or unknown:
        raise RequestRejectedError(f"structured_outputs: give exactly one of {', '.join(KINDS)}", "structured_outputs")
    kind, value = given[0], structured[given[0]]
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise RequestRejectedError(f"structured_outputs.json: not JSON ({e})", "structured_outputs") from e
            except RecursionError as e:
                raise RequestRejectedError("structured_outputs.json: nested too deeply", "structured_outputs") from e
        if value is True:
            value = {}  # `true` is the schema every value matches, as `{}` is
        if value is False:
            raise RequestRejectedError("structured_outputs.json: `false` is a schema no value matches",
                                       "structured_outputs")
        if not isinstance(value, dict):
            raise RequestRejectedError("structured_outputs.json: must be a JSON Schema", "structured_outputs")
        return StructuredSpec("json", _canonical(value, "structured_outputs"), "structured_outputs")
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise RequestRejectedError("structured_outputs.choice: must be a list of non-empty strings",
                                       "structured_outputs")
        return StructuredSpec("choice", json.dumps(value), "structured_outputs")
    if not isinstance(value, str) or not value:
        raise RequestRejectedError(f"structured_outputs.{kind}: must be a non-empty string", "structured_outputs")
    return StructuredSpec(kind, value, "structured_outputs")


def _canonical(schema: dict, param: str) -> str:
    try:
        return json.dumps(schema, sort_keys=True)
    except RecursionError as e:  # a body's JSON is parsed to any depth the parser allows
        raise RequestRejectedError(f"{param}: the schema is nested too deeply", param) from e


# What one compiled template is taken to hold, for the cache's byte bound: llguidance does not report it, so
# it is estimated from the spec's size. Measured (RSS, 1000-token vocabulary): ~80 KB for a small schema,
# ~0.8 MB for a 64 KB regex, the lexer built by the first mask included.
TEMPLATE_BASE_BYTES = 128 * 1024
TEMPLATE_BYTES_PER_SPEC_BYTE = 16


def template_bytes(spec: StructuredSpec) -> int:
    return TEMPLATE_BASE_BYTES + TEMPLATE_BYTES_PER_SPEC_BYTE * len(spec.value.encode())


class GrammarCompiler:
    """Compiled templates by spec, in an LRU of at most `cache_size` templates and `max_cache_bytes` estimated
    bytes (`template_bytes`); thread-safe. The llguidance tokenizer is built on first use (about a second:
    never at start-up)."""

    def __init__(self, tokenizer, vocab_size: int, *, cache_size: int = 256, max_spec_bytes: int = 65536,
                 max_cache_bytes: int = 64 << 20) -> None:
        self._tokenizer = tokenizer  # lmservice/model/tokenizer.py:Tokenizer
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self.max_spec_bytes = max_spec_bytes
        self.max_cache_bytes = max_cache_bytes
        self._lock = threading.Lock()
        self._ll_tokenizer = None
        self._cache: OrderedDict[StructuredSpec, Any] = OrderedDict()
        self.cache_bytes = 0  # template_bytes() summed over the cache
        self.num_compiled = 0

    def _ll(self):
        import llguidance  # here: only with structured output

        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = llguidance.LLTokenizer(self._tokenizer.backend_tokenizer.to_str(),
                                                            n_vocab=self.vocab_size,
                                                            eos_token=self._tokenizer.eos_token_id)
            return self._ll_tokenizer

    def compile(self, spec: StructuredSpec):
        """The template for `spec` (cached). RequestRejectedError naming spec.param when it is too large,
        invalid, uses an unsupported keyword, or cannot be satisfied. Blocking: call it from a thread."""
        if len(spec.value.encode()) > self.max_spec_bytes:
            raise RequestRejectedError(f"{spec.param}: the {spec.kind} spec has {len(spec.value.encode())} bytes; "
                                       f"at most {self.max_spec_bytes} (--max-structured-spec-bytes)", spec.param)
        with self._lock:
            template = self._cache.get(spec)
            if template is not None:
                self._cache.move_to_end(spec)
                return template
        template = self._build(spec)
        with self._lock:
            if spec not in self._cache:
                self.cache_bytes += template_bytes(spec)
            self._cache[spec] = template
            self._cache.move_to_end(spec)
            while len(self._cache) > 1 and (len(self._cache) > self.cache_size
                                            or self.cache_bytes > self.max_cache_bytes):
                evicted, _ = self._cache.popitem(last=False)
                self.cache_bytes -= template_bytes(evicted)
            self.num_compiled += 1
        return template

    def _build(self, spec: StructuredSpec):
        import llguidance  # here, as in _ll: only with structured output
        import llguidance.torch as llt
        import torch

        matcher_cls = llguidance.LLMatcher
        try:  # RecursionError: llguidance's schema reader is recursive too
            if spec.kind == "json":
                grammar = matcher_cls.grammar_from_json_schema(json.loads(spec.value), defaults=JSON_OPTIONS)
            elif spec.kind == "regex":
                grammar = matcher_cls.grammar_from_regex(spec.value)
            elif spec.kind == "choice":
                grammar = llguidance.grammar_from("choice", json.loads(spec.value))
            else:
                grammar = llguidance.grammar_from("grammar", spec.value)  # Lark, or GBNF (converted)
        except (ValueError, TypeError, RecursionError) as e:
            raise RequestRejectedError(f"{spec.param}: invalid {spec.kind}: {_first_line(str(e))}", spec.param) from e
        template = matcher_cls(self._ll(), grammar, log_level=0, limits=llguidance.LLParserLimits(verbose_errors=False))
        # The first mask builds the lexer lazily: pay it here, in this thread, not in an engine step.
        bitmask = torch.full((1, (self.vocab_size + 31) // 32), -1, dtype=torch.int32)
        llt.fill_next_token_bitmask(template, bitmask)
        self._check(spec, template)
        self._probe(spec, template.deep_copy(), bitmask)
        return template

    def _probe(self, spec: StructuredSpec, matcher, bitmask) -> None:
        """Walk PROBE_TOKENS tokens of one output (the lowest allowed id each step) on a copy."""
        import llguidance.torch as llt

        for _ in range(PROBE_TOKENS):
            if matcher.is_stopped():
                return
            words = bitmask[0].tolist()
            token_id = next((32 * w + b for w, word in enumerate(words) if word for b in range(32)
                             if (word >> b) & 1), None)
            if token_id is None or token_id >= self.vocab_size:
                return
            matcher.consume_token(token_id)
            self._check(spec, matcher)
            llt.fill_next_token_bitmask(matcher, bitmask)
            self._check(spec, matcher)

    @staticmethod
    def _check(spec: StructuredSpec, matcher) -> None:
        if matcher.is_error():
            raise RequestRejectedError(f"{spec.param}: invalid {spec.kind}: {_first_line(matcher.get_error())}",
                                       spec.param)
