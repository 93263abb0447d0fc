"""The start-up scan of --adapters-dir trusts no more than POST /v1/adapters does."""

from __future__ import annotations

import json

from lmservice.serving.adapters import find_adapters


def _adapter(path):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    return path


def test_symlinks_leading_outside_and_bad_names_are_skipped(tmp_path):
    root = tmp_path / "adapters"
    _adapter(root / "good")
    outside = _adapter(tmp_path / "elsewhere" / "secret")
    (root / "escape").symlink_to(outside, target_is_directory=True)
    (root / "alias").symlink_to(root / "good", target_is_directory=True)  # inside: fine
    _adapter(root / "trailing-newline\n")
    _adapter(root / "-starts-with-a-dash")
    (root / "not-an-adapter").mkdir()
    assert sorted(find_adapters(root)) == ["alias", "good"]
