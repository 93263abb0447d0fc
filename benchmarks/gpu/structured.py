"""Structured output on the device: the grammar's token mask applied to the GPU's logits.

One batch mixes JSON-schema rows (greedy and seeded sampling) with free greedy rows, on a random-weight
model, where only the mask can make the output valid. Checks: every constrained row is JSON holding the
schema's required keys; the free rows' tokens are what they are alone; the greedy rows' tokens equal the
CPU engine's (fp32, torch kernels) on the same checkpoint. Then benchmarks/structured.py's overhead
figure: a decode step of 32 rows with half of them constrained against none.
"""

from __future__ import annotations

import json
import statistics

from benchmarks.gpu.common import Step

SCHEMA = {  # bounded everywhere, so a random model under the mask finishes well inside max_tokens
    "type": "object", "additionalProperties": False, "required": ["name", "age", "pets"],
    "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 8},
                   "age": {"type": "integer", "minimum": 0, "maximum": 120},
                   "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3}}}
MAX_TOKENS = 96


def _run_batch(engine, template, requests: list[tuple[str, list[int], object, bool]]) -> dict[str, dict]:
    """requests: (id, prompt, params, constrained); returns per id its tokens, text and finish reason."""
    for rid, prompt, params, constrained in requests:
        engine.submit(rid, prompt, params, grammar=template if constrained else None)
    out: dict[str, dict] = {rid: {"tokens": [], "text": "", "finish": None} for rid, *_ in requests}
    while engine.has_unfinished():
        for o in engine.step():
            for c in o.outputs:
                out[o.request_id]["tokens"] += c.token_ids
                out[o.request_id]["text"] += c.text
                out[o.request_id]["finish"] = c.finish_reason or out[o.request_id]["finish"]
    return out


def _engine(step: Step, device: str):
    from lmservice.engine.engine import Engine, EngineConfig
    from lmservice.model.loader import load_model

    loaded = load_model(step.model_dir("gpt2", seed=1), device=device, dtype="float32")
    backend = "triton" if device == "cuda" else "torch"
    return Engine(loaded, EngineConfig.from_fields(num_kv_blocks=512, enable_prefix_caching=False,
                                                   attention_backend=backend))


def _valid(text: str) -> bool:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(value, dict) and set(SCHEMA["required"]) <= set(value) <= set(SCHEMA["properties"])


def run(step: Step) -> None:
    from benchmarks.structured import step_times
    from lmservice.engine.sampling_params import SamplingParams
    from lmservice.serving.structured import GrammarCompiler, StructuredSpec
    from tests.helpers import prompts

    engine = _engine(step, step.device.type)
    template = GrammarCompiler(engine.tokenizer, engine.vocab_size).compile(
        StructuredSpec("json", json.dumps(SCHEMA, sort_keys=True), "response_format"))
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    free = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    ps = prompts(8, engine.vocab_size, 3, 20, seed=5)
    requests = [("json-greedy-0", ps[0], greedy, True), ("json-greedy-1", ps[1], greedy, True)]
    requests += [(f"json-seed-{s}", ps[2 + s], SamplingParams(temperature=1.0, seed=s, max_tokens=MAX_TOKENS), True)
                 for s in range(2)]
    requests += [(f"free-{i}", ps[4 + i], free, False) for i in range(4)]
    mixed = _run_batch(engine, template, requests)
    for rid, *_ in requests[:4]:
        step.check(f"{rid}: valid JSON under the schema", _valid(mixed[rid]["text"]) and mixed[rid]["finish"] == "stop",
                   repr(mixed[rid]["text"][:80]))
    alone = _run_batch(engine, template, [r for r in requests if not r[3]])
    for rid, *_ in requests[4:]:
        step.check(f"{rid}: same tokens beside constrained rows as alone", mixed[rid]["tokens"] == alone[rid]["tokens"])
    on_cpu = _run_batch(_engine(step, "cpu"), template, [r for r in requests if r[2].temperature == 0.0])
    for rid in on_cpu:
        step.check(f"{rid}: greedy tokens equal the CPU engine's", on_cpu[rid]["tokens"] == mixed[rid]["tokens"],
                   f"{step.device.type} vs cpu")
    step.check("every KV block free when idle", engine.pool.num_used_blocks == 0)

    batch, steps = (4, 3) if step.dry else (32, 16)
    free_ms = statistics.median(step_times(engine, batch, 0, None, steps)) * 1e3
    half_ms = statistics.median(step_times(engine, batch, batch // 2, template, steps)) * 1e3
    step.metrics.update(step_ms_free=free_ms, step_ms_half_constrained=half_ms)
    step.table(f"structured output, fp32, {step.device.type}, vocab {engine.vocab_size}: decode step of {batch} rows",
               ["constrained rows", "ms/step", "overhead"],
               [[0, f"{free_ms:.2f}", ""], [f"{batch // 2} (JSON schema)", f"{half_ms:.2f}", f"{half_ms / free_ms - 1:+.0%}"]])
