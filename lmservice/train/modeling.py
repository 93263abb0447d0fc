"""Loading the base model a job starts from, and wrapping it with LoRA (PEFT).

Only GPT-2-family checkpoints (config.json `model_type` == "gpt2": gpt2 ...
gpt2-xl, distilgpt2, DialoGPT, our own) are accepted: the server runs only
that architecture, so training anything else would make an unservable artifact.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoTokenizer, PreTrainedTokenizerBase


class ModelError(ValueError):
    """A base model or LoRA setting that cannot be trained (caught before training)."""


def check_gpt2_family(model_dir: Path) -> dict:
    """The parsed config.json of `model_dir`; raises ModelError unless it is GPT-2-family."""
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise ModelError(f"{config_path}: no such file (expected a Hugging Face GPT-2-family checkpoint dir)")
    config = json.loads(config_path.read_text())
    model_type = config.get("model_type")
    if model_type != "gpt2":
        raise ModelError(f"{config_path}: model_type is {model_type!r}; only GPT-2-family models "
                         "(model_type 'gpt2') can be trained and served")
    return config


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer, with a pad token (EOS when it has none, as GPT-2 has none)."""
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.eos_token_id is None:
        raise ModelError(f"{model_dir}: tokenizer has no eos_token (set it in tokenizer_config.json)")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def lora_target_names(model: torch.nn.Module) -> list[str]:
    """Leaf names of the modules LoRA can wrap: Linear, GPT-2's Conv1D and the embeddings (`wte`, `wpe`)."""
    from transformers.pytorch_utils import Conv1D

    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear | Conv1D | torch.nn.Embedding)}
    return sorted(names)


def check_lora_targets(model: torch.nn.Module, targets: Sequence[str]) -> None:
    available = lora_target_names(model)
    unknown = [t for t in targets if t not in available]
    if unknown:
        raise ModelError(f"LoRA target(s) {unknown} do not exist in the model; choose from {available}")


def apply_lora(model: torch.nn.Module, r: int, alpha: float, dropout: float, targets: Sequence[str],
               modules_to_save: Sequence[str] | None = None, task_type: str | None = None) -> PeftModel:
    """`model` with frozen weights and trainable LoRA factors on `targets` (+ `modules_to_save`)."""
    check_lora_targets(model, targets)
    if r <= 0:
        raise ModelError(f"--lora-r must be positive, got {r}")
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(targets),
        fan_in_fan_out=True,  # GPT-2's Conv1D stores weights as (in, out)
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        task_type=task_type,
    )
    return get_peft_model(model, config)


def load_for_training(args: argparse.Namespace, model_cls: type, task_type: str,
                      modules_to_save: Sequence[str] | None = None, **from_pretrained_kwargs: Any):
    """(model, tokenizer) from `args.base`: GPT-2-family checked first, LoRA-wrapped when `args.lora`.

    fp32 weights whatever the checkpoint's dtype: optimizer updates in half
    precision lose small LoRA steps (--bf16 autocasts the compute instead).
    """
    if getattr(args, "lora_extract", False) and not args.lora:
        raise ModelError("--lora-extract saves a LoRA adapter: give --lora (and --lora-r) with it")
    check_gpt2_family(args.base)
    tokenizer = load_tokenizer(args.base)
    model = model_cls.from_pretrained(str(args.base), dtype=torch.float32, **from_pretrained_kwargs)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if args.lora and getattr(args, "lora_extract", False):
        freeze_for_extraction(model, args.lora_targets, modules_to_save or ())
    elif args.lora:
        model = apply_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets,
                           modules_to_save=modules_to_save, task_type=task_type)
    return model, tokenizer


def freeze_for_extraction(model: torch.nn.Module, targets: Sequence[str], modules_to_save: Sequence[str]) -> None:
    """Leave trainable only what a LoRA adapter can carry: the weights of the `targets` projections
    and the whole of `modules_to_save` (embeddings, norms and biases stay the base's)."""
    check_lora_targets(model, targets)
    for name, param in model.named_parameters():
        parts = name.split(".")
        param.requires_grad = (parts[-1] == "weight" and len(parts) > 1 and parts[-2] in targets) or any(
            m in parts for m in modules_to_save)


def lora_finalizer(args: argparse.Namespace, task_type: str,
                   modules_to_save: Sequence[str] | None = None) -> Callable[[torch.nn.Module], PeftModel] | None:
    """With --lora-extract: the function that turns the trained model into the adapter a job saves."""
    if not (getattr(args, "lora", False) and getattr(args, "lora_extract", False)):
        return None

    def finalize(trained: torch.nn.Module) -> PeftModel:
        base = type(trained).from_pretrained(str(args.base), config=trained.config, dtype=torch.float32)
        return extract_lora(trained, base, args.lora_r, args.lora_alpha, args.lora_targets,
                            modules_to_save or (), task_type)

    return finalize


@torch.no_grad()
def extract_lora(trained: torch.nn.Module, base: torch.nn.Module, r: int, alpha: float, targets: Sequence[str],
                 modules_to_save: Sequence[str], task_type: str | None) -> PeftModel:
    """`base` + a rank-`r` LoRA adapter holding `trained - base` on the `targets` projections.

    Each change is cut to its best rank-r approximation (SVD; exact when r >= its rank), split evenly
    between the factors: B A * scaling == U_r S_r V_r^T. `modules_to_save` are copied whole.
    """
    trained_params = dict(trained.named_parameters())
    model = apply_lora(base, r, alpha, 0.0, targets, modules_to_save=modules_to_save, task_type=task_type)
    scaling = alpha / r
    prefix = "base_model.model."
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            lora_a, lora_b = module.lora_A["default"].weight, module.lora_B["default"].weight
            transposed = module.fan_in_fan_out  # GPT-2's Conv1D stores (in, out); LoRA's B A is (out, in)
        elif hasattr(module, "lora_embedding_A") and "default" in module.lora_embedding_A:
            lora_a, lora_b = module.lora_embedding_A["default"], module.lora_embedding_B["default"]
            transposed = True  # an embedding stores (vocab, dim); its B A is (dim, vocab)
        else:
            continue
        base_weight = module.base_layer.weight
        delta = trained_params[name.removeprefix(prefix) + ".weight"].float() - base_weight.float()
        if transposed:
            delta = delta.T
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        k = min(r, s.numel())
        root = s[:k].sqrt()
        a, b = torch.zeros_like(lora_a), torch.zeros_like(lora_b)
        a[:k] = root[:, None] * vh[:k]
        b[:, :k] = u[:, :k] * root / scaling
        lora_a.copy_(a)
        lora_b.copy_(b)
    inner = model.get_base_model()
    for name in modules_to_save:
        inner.get_submodule(name).modules_to_save["default"].load_state_dict(trained.get_submodule(name).state_dict())
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
