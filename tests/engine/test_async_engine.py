"""lmservice/engine/async_engine.py through the serving layer: admission on the caller's side, all or none."""

from __future__ import annotations

import asyncio
import time

import pytest

from lmservice.engine.async_engine import AsyncEngine
from lmservice.engine.engine import Engine, EngineConfig
from lmservice.engine.outputs import QueueFullError
from lmservice.engine.sampling_params import SamplingParams
from lmservice.model.loader import load_model
from lmservice.serving.bootstrap import serving_for
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


def _steps_while_streaming(tiny_model_dir, handoff_timeout_s, block_loop_s: float) -> tuple[int, int]:
    """Engine steps taken while the event loop is blocked for `block_loop_s`, and the tokens streamed."""
    async def scenario():
        engine = Engine(load_model(tiny_model_dir, "cpu", "float32"), EngineConfig.from_fields(num_kv_blocks=64))
        async_engine = AsyncEngine(engine, handoff_timeout_s=handoff_timeout_s)
        async_engine.start()
        stream = async_engine.add_requests([engine.validator.check("r0", [1, 2, 3],
                                                                   SamplingParams(max_tokens=120, **GREEDY))])[0]
        first = await anext(aiter(stream))
        before = engine.num_steps
        time.sleep(block_loop_s)  # the loop is busy: nothing takes the outputs
        during = engine.num_steps - before
        tokens = len(first.outputs[0].token_ids) + sum([len(o.outputs[0].token_ids) async for o in stream])
        await async_engine.shutdown()
        return during, tokens

    return asyncio.run(scenario())


def test_handoff_makes_the_engine_wait_for_the_loop_but_never_hang(tiny_model_dir):
    """With a hand-off the engine thread takes turns with the event loop: while the loop is blocked it
    steps once per timeout, not freely; without one it runs on. Either way every token arrives."""
    free, tokens = _steps_while_streaming(tiny_model_dir, None, 0.3)
    assert tokens == 120
    handed_off, tokens = _steps_while_streaming(tiny_model_dir, 0.1, 0.3)
    assert tokens == 120
    assert 1 <= handed_off <= 4, handed_off  # one step per 0.1 s timeout while blocked
    assert free > 2 * handed_off, (free, handed_off)
