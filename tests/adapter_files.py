"""Hand-written PEFT LoRA directories, and the hostile ones a careless or malicious operator could drop into an
adapters dir (tests/model/test_lora_files.py, tests/serving/test_adapters.py, tests/api/test_adapter_files.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from lmservice.model.lora import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE

REDOS_KEY = "([a-z0-9._]+)+Q"  # catastrophic backtracking under `re` on every GPT-2 module name


def write_adapter(path: Path, r: int = 2, n_embd: int = 32, seed: int = 0, **config) -> Path:
    """A minimal PEFT LoRA directory, no PEFT needed: rank r on h.0's and h.1's c_attn of a base of width n_embd."""
    path.mkdir(parents=True)
    (path / ADAPTER_CONFIG_FILE).write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": 4, "target_modules": ["c_attn"], **config}))
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in (0, 1):
        prefix = f"base_model.model.transformer.h.{layer}.attn.c_attn"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, n_embd, generator=gen) * 0.1
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(3 * n_embd, r, generator=gen) * 0.1
    save_file(tensors, path / ADAPTER_WEIGHTS_FILE)
    return path


def write_hostile_adapters(root: Path, outside: Path, n_embd: int) -> dict[str, str]:
    """Adapters under `root` that must each be refused, name -> the words the refusal carries; `outside`
    (not under root) receives a real adapter that one of them links into."""
    real = write_adapter(outside / "real", n_embd=n_embd)
    write_adapter(root / "paren", n_embd=n_embd, rank_pattern={"(": 4})
    deep = write_adapter(root / "deep", n_embd=n_embd)
    (deep / ADAPTER_CONFIG_FILE).write_text("[" * 100_000 + "]" * 100_000)
    passwd = write_adapter(root / "passwd", n_embd=n_embd)
    (passwd / ADAPTER_CONFIG_FILE).unlink()
    (passwd / ADAPTER_CONFIG_FILE).symlink_to("/etc/passwd")
    stolen = write_adapter(root / "stolen", n_embd=n_embd)
    for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE):
        (stolen / name).unlink()
        (stolen / name).symlink_to(real / name)
    (root / "escape").symlink_to(real, target_is_directory=True)
    return {"paren": "rank_pattern: key '(' is not a pattern", "deep": "JSON nested too deeply",
            "passwd": "is a link to a file outside", "stolen": "is a link to a file outside",
            "escape": "outside the adapters dir"}
