"""lmservice/model/lora.py reads an adapter directory as hostile data: every file confined to its root, JSON
size- and depth-bounded, rank_pattern/alpha_pattern on a linear-time regex engine; whatever the files hold,
the answer is a LoRAAdapterError naming file and field, in bounded time. Each refusal sits beside a
directory that differs only in the fault and loads."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lmservice.model.card import CARD_FILE
from lmservice.model.lora import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    MAX_JSON_FILE_BYTES,
    MAX_PATTERN_KEYS,
    LoRAAdapterError,
    LoRATargets,
    load_lora_adapter,
    pattern_values,
    read_adapter,
)
from tests.adapter_files import REDOS_KEY, write_adapter

TARGETS = LoRATargets(n_layer=2, n_embd=32, n_inner=128)
MAX_LORA_RANK = 8
GPT2_MODULES = [f"transformer.h.{i}.{m}" for i in range(48) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc")]


def load(path: Path, root: Path | None = None):
    return load_lora_adapter(path, TARGETS, MAX_LORA_RANK, root=root)


def test_the_innocent_adapter_loads(tmp_path):
    adapter = load(write_adapter(tmp_path / "ok"))
    assert adapter.rank == 2 and sorted(adapter.weights) == ["h.0.attn.c_attn", "h.1.attn.c_attn"]


@pytest.mark.parametrize("filename", [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, CARD_FILE])
def test_a_file_linked_outside_the_root_is_refused(tmp_path, filename):
    outside = write_adapter(tmp_path / "outside")
    (outside / CARD_FILE).write_text(json.dumps({"task": "generate"}))
    linked = write_adapter(tmp_path / "adapters" / "linked")
    (linked / CARD_FILE).write_text(json.dumps({"task": "generate"}))
    (linked / filename).unlink()
    (linked / filename).symlink_to(outside / filename)
    with pytest.raises(LoRAAdapterError, match=f"{filename}: file: is a link to a file outside"):
        read_adapter(linked, TARGETS, MAX_LORA_RANK, root=tmp_path / "adapters")
    # the same link is fine when the root holds its target (a file shared by two adapters in one dir)
    read_adapter(linked, TARGETS, MAX_LORA_RANK, root=tmp_path)


def test_a_link_to_a_system_file_is_refused_unread(tmp_path):
    linked = write_adapter(tmp_path / "passwd")
    (linked / ADAPTER_CONFIG_FILE).unlink()
    (linked / ADAPTER_CONFIG_FILE).symlink_to("/etc/passwd")
    with pytest.raises(LoRAAdapterError, match="outside") as info:
        load(linked)
    assert "root:" not in str(info.value)


def test_a_dangling_link_and_a_directory_are_not_files(tmp_path):
    dangling = write_adapter(tmp_path / "dangling")
    (dangling / ADAPTER_WEIGHTS_FILE).unlink()
    (dangling / ADAPTER_WEIGHTS_FILE).symlink_to(dangling / "nowhere")
    with pytest.raises(LoRAAdapterError, match="not a regular file"):
        load(dangling)
    directory = write_adapter(tmp_path / "dir")
    (directory / ADAPTER_CONFIG_FILE).unlink()
    (directory / ADAPTER_CONFIG_FILE).mkdir()
    with pytest.raises(LoRAAdapterError, match="not a regular file"):
        load(directory)


def test_a_backtracking_pattern_loads_in_bounded_time(tmp_path):
    """Under `re` this key took minutes on a GPT-2's module names; RE2 matches in linear time."""
    start = time.monotonic()
    adapter = load(write_adapter(tmp_path / "redos", rank_pattern={REDOS_KEY: 4}, alpha_pattern={REDOS_KEY: 1}))
    assert time.monotonic() - start < 2.0
    assert adapter.rank == 2  # the key matches no module: the default r applies
    start = time.monotonic()
    assert pattern_values({REDOS_KEY: 4}, GPT2_MODULES * 10, 2) == dict.fromkeys(GPT2_MODULES, 2)
    assert time.monotonic() - start < 2.0


@pytest.mark.parametrize(("key", "problem"), [
    ("(", "missing \\)"),
    ("(?<=h)\\.0", "no backreferences or lookarounds"),
    ("(c)_\\1", "no backreferences or lookarounds"),
    ("x{1001}", "repetition"),
    ("((((a{100}){100}){100}){100})", "not a pattern lmservice runs"),  # a program past RE2's memory budget
])
def test_a_pattern_re2_cannot_run_is_a_clear_error(tmp_path, key, problem):
    with pytest.raises(LoRAAdapterError, match=f"rank_pattern: key .* {problem}"):
        load(write_adapter(tmp_path / "bad", rank_pattern={key: 4}))


def test_pattern_values_follow_peft_rule():
    """The same answers as PEFT's `re.match(rf"(.*\\.)?({key})$", name)`, first key first."""
    names = ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_fc",
             "transformer.h.10.mlp.c_fc", "transformer.wte"]
    patterns = {"h.1.attn.c_attn": 3, r"h\.1\d?\.mlp\..*": 5, "c_fc": 7, "wte": 9, "attn": 11}
    expected = {}
    for name in names:
        expected[name] = next((v for k, v in patterns.items() if re.match(rf"(.*\.)?({k})$", name)), 1)
    assert pattern_values(patterns, names, 1) == expected
    assert expected["transformer.h.1.attn.c_attn"] == 3 and expected["transformer.h.0.attn.c_attn"] == 1


def test_rank_pattern_still_sets_a_module_rank(tmp_path):
    path = write_adapter(tmp_path / "ranked", r=2, rank_pattern={r"h\.1\.attn\.c_attn": 4})
    save_file({"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": torch.randn(2, 32),
               "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": torch.randn(96, 2),
               "base_model.model.transformer.h.1.attn.c_attn.lora_A.weight": torch.randn(4, 32),
               "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight": torch.randn(96, 4)},
              path / ADAPTER_WEIGHTS_FILE)
    adapter = load(path)
    assert adapter.weights["h.1.attn.c_attn"][0].shape == (4, 32) and adapter.rank == 4


def test_deeply_nested_json_is_refused(tmp_path):
    nested = write_adapter(tmp_path / "nested")
    (nested / ADAPTER_CONFIG_FILE).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(LoRAAdapterError, match="adapter_config.json: file: JSON nested too deeply"):
        load(nested)
    card = write_adapter(tmp_path / "card")
    (card / CARD_FILE).write_text('{"data": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(LoRAAdapterError, match="lmservice.json: file: JSON nested too deeply"):
        read_adapter(card, TARGETS, MAX_LORA_RANK)


@pytest.mark.parametrize(("config_text", "problem"), [
    (" " * MAX_JSON_FILE_BYTES + "{}", "larger than"),
    (b"\xff\xfe{}", "not UTF-8"),
    ('{"r": ' + "9" * 5000 + "}", "not valid JSON"),  # past Python's integer digit limit
    ("[1, 2]", "must hold a JSON object"),
])
def test_malformed_config_files_are_refused(tmp_path, config_text, problem):
    path = write_adapter(tmp_path / "bad")
    write = (path / ADAPTER_CONFIG_FILE).write_bytes if isinstance(config_text, bytes) else (
        path / ADAPTER_CONFIG_FILE).write_text
    write(config_text)
    with pytest.raises(LoRAAdapterError, match=problem) as info:
        load(path)
    assert len(str(info.value)) < 400


@pytest.mark.parametrize(("config", "field"), [
    ({"lora_alpha": float("nan")}, "lora_alpha"),
    ({"lora_alpha": 10**400}, "lora_alpha"),
    ({"use_rslora": "yes"}, "use_rslora"),
    ({"modules_to_save": [["score"]]}, "modules_to_save"),
    ({"target_modules": [{"c_attn": 1}]}, "target_modules"),
    ({"target_modules": 7}, "target_modules"),
    ({"rank_pattern": {"c_attn": "4"}}, "rank_pattern"),
    ({"alpha_pattern": {"c_attn": [1] * 10_000}}, "alpha_pattern"),
    ({"rank_pattern": {f"k{i}": 2 for i in range(MAX_PATTERN_KEYS + 1)}}, "rank_pattern"),
    ({"rank_pattern": {"x" * 5000: 2}}, "rank_pattern"),
    ({"use_dora": [[[[[[["deep"] * 1000]]]]]]}, "use_dora"),
])
def test_wrongly_typed_fields_are_refused_with_a_short_message(tmp_path, config, field):
    with pytest.raises(LoRAAdapterError, match=f"adapter_config.json: {field}: ") as info:
        load(write_adapter(tmp_path / "bad", **config))
    assert len(str(info.value)) < 400


def test_a_broken_card_names_the_card(tmp_path):
    path = write_adapter(tmp_path / "card")
    (path / CARD_FILE).write_text(json.dumps({"task": "classify"}))
    with pytest.raises(LoRAAdapterError, match="lmservice.json: card: invalid model card"):
        read_adapter(path, TARGETS, MAX_LORA_RANK)
    (path / CARD_FILE).write_text(json.dumps({"task": "classify", "labels": ["a", "b"]}))
    assert read_adapter(path, TARGETS, MAX_LORA_RANK)[1].labels == ["a", "b"]
