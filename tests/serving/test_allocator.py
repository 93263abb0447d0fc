"""lmservice/serving/allocator.py: the heap is trimmed after work, only while the engine idles, and the trimmer
ends with the server."""

from __future__ import annotations

import time

from lmservice.serving import allocator


def wait_for(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_trims_once_after_work_while_idle_and_never_while_busy():
    state = {"idle": False, "work": 0, "done": False}
    trimmer = allocator.IdleTrimmer(lambda: state["idle"], lambda: state["work"], lambda: state["done"],
                                    interval_s=0.01).start()
    state["work"] = 1  # busy: work moves, the engine is not idle
    time.sleep(0.1)
    assert trimmer.num_trims == 0
    state["idle"] = True
    wait_for(lambda: trimmer.num_trims == 1)
    time.sleep(0.1)
    assert trimmer.num_trims == 1  # idle without new work: nothing more to hand back
    state["work"] = 2
    wait_for(lambda: trimmer.num_trims == 2)
    state["done"] = True
    trimmer._thread.join(5)
    assert not trimmer._thread.is_alive()


def test_glibc_calls_answer():
    assert allocator.limit_arenas(allocator.MAX_ARENAS) in (True, False)
    assert allocator.trim() in (True, False)
