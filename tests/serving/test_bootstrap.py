"""Every engine default is written once (the engine's configs), Settings takes it from there under the
same name, and building the engine's config from Settings carries every field across."""

from __future__ import annotations

from dataclasses import fields

import pytest

from service.config import Settings
from service.engine.config import EngineConfig
from service.engine.sampling_params import RequestLimits
from service.engine.scheduler import SchedulerConfig
from service.serving.bootstrap import engine_config

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
