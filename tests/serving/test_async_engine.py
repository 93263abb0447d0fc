"""service/engine/async_engine.py through the serving layer: admission on the caller's side, all or none."""

from __future__ import annotations

import asyncio

import pytest

from service.engine.engine import Engine, EngineConfig
from service.engine.outputs import QueueFullError
from service.engine.sampling_params import SamplingParams
from service.model.loader import load_model
from service.serving.bootstrap import serving_for
from tests.helpers import submit

GREEDY = dict(temperature=0.0, ignore_eos=True)


def test_async_admission_counts_queued_requests_and_answers_queue_full(tiny_model_dir):
    async def scenario():
        serving = serving_for(Engine(load_model(tiny_model_dir, "cpu", "float32"),
                                     EngineConfig.from_fields(num_kv_blocks=64, max_waiting_requests=4)))
        engine = serving.engine
        engine.start()
        params = SamplingParams(max_tokens=2, n=2, **GREEDY)
        streams = [submit(serving, "r0", [1, 2, 3], params), submit(serving, "r1", [1, 2, 3], params)]
        with pytest.raises(QueueFullError):  # same loop tick: the first two are still in the command queue
            submit(serving, "r2", [1, 2, 3], params)
        for stream in streams:
            assert [o async for o in stream][-1].finished
        await engine.shutdown()

    asyncio.run(scenario())
