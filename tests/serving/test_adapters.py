"""The start-up scan of --adapters-dir trusts no more than POST /v1/adapters does, and one bad adapter
costs only itself: the good ones load, each bad one is one log line naming it and why, and a count."""

from __future__ import annotations

import json
import logging
import time

import pytest

from lmservice.serving.adapters import AdapterLinkError, AdapterPathError, find_adapters, resolve_adapter_dir
from lmservice.serving.bootstrap import load_adapters_dir, serving_for
from tests.adapter_files import REDOS_KEY, write_adapter, write_hostile_adapters


def _adapter(path):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    return path


def test_symlinks_leading_outside_and_bad_names_are_refused(tmp_path):
    root = tmp_path / "adapters"
    _adapter(root / "good")
    outside = _adapter(tmp_path / "elsewhere" / "secret")
    (root / "escape").symlink_to(outside, target_is_directory=True)
    (root / "alias").symlink_to(root / "good", target_is_directory=True)  # inside: fine
    _adapter(root / "trailing-newline\n")
    _adapter(root / "-starts-with-a-dash")
    (root / "not-an-adapter").mkdir()
    found, refused = find_adapters(root)
    assert sorted(found) == ["alias", "good"]
    assert {p.name: reason.split(" (")[0] for p, reason in refused.items()} == {
        "escape": "it leads outside the adapters dir", "trailing-newline\n": "not a valid adapter name",
        "-starts-with-a-dash": "not a valid adapter name"}


def test_the_scan_loads_the_good_and_skips_each_bad_one_with_a_log_line(tiny_engine, tmp_path, caplog):
    engine = tiny_engine()
    n_embd = engine.loaded.config.n_embd
    root = tmp_path / "adapters"
    write_adapter(root / "good", n_embd=n_embd)
    write_adapter(root / "redos", n_embd=n_embd, rank_pattern={REDOS_KEY: 4})  # matches nothing: loads
    hostile = write_hostile_adapters(root, tmp_path / "outside", n_embd)
    serving = serving_for(engine, adapters_dir=root)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="lmservice.serving"):
        load_adapters_dir(serving.models, root)
    assert time.monotonic() - start < 5.0
    assert [m.name for m in serving.models.models()][1:] == ["good", "redos"]
    assert serving.models.num_load_failures == len(hostile)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == len(hostile), lines
    for name, reason in hostile.items():
        [line] = [line for line in lines if f"/adapters/{name}" in line]
        assert line.startswith("adapter ") and " not loaded: " in line and reason in line, line
        assert len(line) < 500


def test_a_requested_path_that_loops_or_escapes_is_refused(tmp_path):
    root = tmp_path / "adapters"
    _adapter(root / "good")
    (root / "loop").symlink_to(root / "loop")
    with pytest.raises(AdapterPathError, match="cannot be resolved"):
        resolve_adapter_dir(root, "loop/x")
    with pytest.raises(AdapterPathError, match="outside the adapters dir"):
        resolve_adapter_dir(root, "../" * 50)
    (root / "escape").symlink_to(_adapter(tmp_path / "elsewhere"), target_is_directory=True)
    with pytest.raises(AdapterLinkError, match="a link leading outside the adapters dir"):  # the files' fault
        resolve_adapter_dir(root, "escape")
    assert not issubclass(AdapterLinkError, AdapterPathError)
    assert resolve_adapter_dir(root, "good") == (root / "good").resolve()
