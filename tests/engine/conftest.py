from __future__ import annotations

import pytest
import torch

from service.engine.engine import Engine, EngineConfig
from service.model.loader import load_model


def run_to_completion(engine: Engine, requests: list[tuple], stagger: int = 0) -> dict[str, dict]:
    """Add (request_id, prompt_ids, params[, adapter[, task]]) requests — `stagger` of them per step after the
    first batch when stagger > 0 — and step until idle. Returns per request id: tokens per
    index, text per index, logprobs per index, finish reasons, and the raw events."""
    results: dict[str, dict] = {}
    pending = list(requests)

    def add(n: int) -> None:
        for _ in range(min(n, len(pending))):
            rid, ids, params, *rest = pending.pop(0)
            adapter, task = (list(rest) + [None, "generate"][len(rest):])[:2]
            engine.add_request(rid, ids, params, adapter=adapter, task=task)
            results[rid] = {"tokens": {}, "text": {}, "logprobs": {}, "finish": {}, "events": []}

    add(stagger or len(pending))
    while engine.has_unfinished() or pending:
        add(stagger)
        for out in engine.step():
            r = results[out.request_id]
            r["events"].append(out)
            r["scores"] = out.scores
            for c in out.outputs:
                r["tokens"].setdefault(c.index, []).extend(c.token_ids)
                r["text"][c.index] = r["text"].get(c.index, "") + c.text
                if c.logprobs:
                    r["logprobs"].setdefault(c.index, []).extend(c.logprobs)
                if c.finish_reason:
                    r["finish"][c.index] = (c.finish_reason, c.stop_reason)
    return results


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from tests.helpers import make_gpt2_dir

    return make_gpt2_dir(tmp_path_factory.mktemp("tiny") / "model", seed=1)


@pytest.fixture
def tiny_engine(tiny_model_dir):
    def build(**kwargs) -> Engine:
        kwargs.setdefault("num_kv_blocks", 128)
        return Engine(load_model(tiny_model_dir, device="cpu", dtype="float32"), EngineConfig(**kwargs))

    torch.manual_seed(0)
    return build
