"""Every engine default is written once (the engine's configs), Settings takes it from there under the
same name, and building the engine's config from Settings carries every field across; and what building
the serving state leaves behind on the main thread."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from lmservice.config import Settings
from lmservice.engine.config import EngineConfig
from lmservice.engine.sampling_params import RequestLimits
from lmservice.engine.scheduler import SchedulerConfig
from lmservice.serving.bootstrap import engine_config
from tests.helpers import make_gpt2_dir

CONFIGS = (EngineConfig, SchedulerConfig, RequestLimits)


def _defaults(cls) -> dict:
    return {f.name: f.default for f in fields(cls) if f.name not in ("scheduler", "limits")}


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_engine_setting_is_a_settings_field_with_the_same_default(cls):
    for name, default in _defaults(cls).items():
        assert name in Settings.model_fields, f"{cls.__name__}.{name} has no Settings field (no flag, no env var)"
        assert Settings.model_fields[name].default == default, name


def test_engine_config_from_settings_carries_every_field():
    overrides = {"block_size": 8, "num_kv_blocks": 99, "max_num_seqs": 7, "max_waiting_tokens": 1234,
                 "max_loras": 3, "max_n": 5, "max_stop_length": 9, "seed": 42, "enable_prefix_caching": False}
    config = engine_config(Settings(**overrides))
    flat = {**_defaults(EngineConfig), **_defaults(SchedulerConfig), **_defaults(RequestLimits)}
    got = {**{k: getattr(config, k) for k in _defaults(EngineConfig)},
           **{k: getattr(config.scheduler, k) for k in _defaults(SchedulerConfig)},
           **{k: getattr(config.limits, k) for k in _defaults(RequestLimits)}}
    assert got == {**flat, **overrides}
    assert EngineConfig.field_names() == set(flat)


def test_from_fields_refuses_a_name_no_config_has():
    with pytest.raises(TypeError, match="max_num_seq"):
        EngineConfig.from_fields(max_num_seq=3)  # a typo must not be dropped silently
    with pytest.raises(TypeError):
        EngineConfig(block_size=8, max_num_seqs=3)  # keyword-only, nested: the scheduler's fields live there


_ONE_TEAM_SCRIPT = r"""
import os, sys, threading, time
import torch
from lmservice.config import Settings
from lmservice.engine.sampling_params import SamplingParams
from lmservice.serving.bootstrap import build_serving

threads = os.cpu_count()
serving = build_serving(Settings(model=sys.argv[1], threads=threads, quantization="int8", num_kv_blocks=64))
engine = serving.engine.engine
assert engine.runner.fast_path is not None
engine.submit("a", list(range(1, 30)), SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True))

def switches():
    total = 0
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        for line in open(f"/proc/{os.getpid()}/task/{task}/status"):
            if line.startswith("voluntary_ctxt_switches"):
                total += int(line.split()[1])
    return total

result = {}
def steps():  # as the server's engine thread: a thread of its own
    for _ in range(5):
        engine.step()
    before = switches()
    for _ in range(50):
        engine.step()
    result["per_step"] = (switches() - before) / 50
worker = threading.Thread(target=steps)
worker.start()
worker.join()
print(result["per_step"])
"""


def test_the_engine_thread_owns_the_only_openmp_team(tmp_path):
    """build_serving loads on a thread that ends (lmservice/serving/bootstrap.py): a parallel op at load leaves no
    OpenMP team on the main thread beside the engine thread's, so with one thread per core libgomp keeps its
    workers spinning between the step's parallel regions instead of putting them to sleep at every one."""
    from lmservice.kernels.cpu_native import int8_kernel_available, native_library

    if native_library() is None or not int8_kernel_available() or not Path("/proc/self/task").is_dir():
        pytest.skip("needs the native int8 kernels and Linux's /proc")
    model_dir = make_gpt2_dir(tmp_path / "m", seed=0, vocab_size=4000, n_positions=256, n_embd=256, n_layer=4, n_head=4)
    done = subprocess.run([sys.executable, "-c", _ONE_TEAM_SCRIPT, str(model_dir)], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    # each step has dozens of parallel regions (4 layers, ~8 each): sleeping at each would be 30+ switches
    assert float(done.stdout.split()[-1]) < 10
