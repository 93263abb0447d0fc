"""Loading a GPT-2-family checkpoint directory: weights, config, tokenizer, card.

Weights come from safetensors (single or sharded) or `pytorch_model.bin` read
with `torch.load(weights_only=True)`: nothing unpickles arbitrary objects. The
model is built on the meta device and the checkpoint tensors are assigned to it
directly, so the weights are materialised once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from lmservice.model.card import ModelCard
from lmservice.model.config import GPT2Config, ModelConfigError
from lmservice.model.cpu import has_bf16_matmul
from lmservice.model.cpu_linear import resolve_linear_backend, use_onednn
from lmservice.model.gpt2 import GPT2ForServing
from lmservice.model.quantize import QUANTIZATIONS, quantize_int4, quantize_int8
from lmservice.model.tokenizer import Tokenizer

_CONV1D_SUFFIXES = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # HF's causal-mask buffers
_TRANSFORMER_PARTS = ("wte.", "wpe.", "h.", "ln_f.")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A servable base model: module (eval, on its device), config, tokenizer and card."""

    name: str
    path: Path
    model: GPT2ForServing
    config: GPT2Config
    tokenizer: Tokenizer
    card: ModelCard
    dtype: torch.dtype
    device: torch.device
    quantization: str = "none"  # --quantization: none, int8 or int4


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelConfigError("device `cuda` was asked for but no CUDA device is available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on CUDA; on a CPU, bfloat16 only where it has bf16 matmul tiles (AMX: its prefills and
    batches on the tiles, its few-sequence decode steps in C on half of fp32's bytes; faster than fp32 at every
    concurrency measured, docs/benchmarks.md), float32 elsewhere (bf16 without them is much slower)."""
    if dtype == "auto":
        if device.type == "cuda" or has_bf16_matmul():
            return torch.bfloat16
        return torch.float32
    return DTYPES[dtype]


def _weight_files(model_dir: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = model_dir / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [model_dir / s for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (model_dir / name).is_file():
            return [model_dir / name]
    raise ModelConfigError(f"{model_dir}: no weights found (model.safetensors, its sharded index, or pytorch_model.bin)")


def read_checkpoint(model_dir: Path) -> dict[str, tuple[torch.Tensor, Path]]:
    """Every tensor of the checkpoint under its canonical HF name, with the file it came from."""
    tensors: dict[str, tuple[torch.Tensor, Path]] = {}
    for path in _weight_files(model_dir):
        if not path.is_file():
            raise ModelConfigError(f"{path}: shard listed in the index is missing")
        if path.suffix == ".safetensors":
            shard = load_file(str(path))
        else:
            shard = torch.load(path, map_location="cpu", weights_only=True)
        for name, tensor in shard.items():
            if name.endswith(_IGNORED_SUFFIXES):
                continue
            if name.startswith(_TRANSFORMER_PARTS):  # checkpoints saved from GPT2Model
                name = "transformer." + name
            tensors[name] = (tensor, path)
    return tensors


def load_model(model_dir: Path, device: str = "auto", dtype: str = "auto", name: str | None = None,
               quantization: str = "none", linear_backend: str = "auto") -> LoadedModel:
    """Load a checkpoint directory; any mismatch fails here, naming the file and the field.
    quantization "int8": 8-bit weights (lmservice/model/quantize.py), fp32 activations, CPU only; "int4": 4-bit
    blocks of 32 weights (the LM head int8), the same otherwise.
    linear_backend: how fp32 projections run on a CPU (lmservice/model/cpu_linear.py)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelConfigError(f"{model_dir}: model directory not found")
    if quantization not in QUANTIZATIONS:
        raise ModelConfigError(f"quantization {quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
    config = GPT2Config.from_dir(model_dir)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if quantization in ("int8", "int4"):
        if torch_device.type != "cpu":
            raise ModelConfigError(f"--quantization {quantization} runs on the CPU only (its int8 kernels have no "
                                   "CUDA versions); on a GPU serve bfloat16")
        if dtype not in ("auto", "float32"):
            raise ModelConfigError(f"--quantization {quantization} computes in float32; --dtype {dtype} cannot go "
                                   "with it")
        torch_dtype = torch.float32
    tensors = read_checkpoint(model_dir)

    with torch.device("meta"):
        model = GPT2ForServing(config)
    expected = dict(model.named_parameters())
    tie = config.tie_word_embeddings
    if tie:
        tensors.pop("lm_head.weight", None)
        expected.pop("lm_head.weight")
    elif "lm_head.weight" not in tensors:
        raise ModelConfigError(f"{model_dir}/config.json: field `tie_word_embeddings` is false but the "
                               "checkpoint has no `lm_head.weight`")

    state: dict[str, torch.Tensor] = {}
    for key, param in expected.items():
        if key not in tensors:
            raise ModelConfigError(f"{model_dir}: checkpoint has no tensor `{key}` required by config.json "
                                   f"(n_layer={config.n_layer}, architectures={list(config.architectures)})")
        tensor, path = tensors.pop(key)
        if key.endswith(_CONV1D_SUFFIXES):
            tensor = tensor.t()  # HF Conv1D (in, out) -> nn.Linear (out, in)
        if tuple(tensor.shape) != tuple(param.shape):
            raise ModelConfigError(
                f"{path}: tensor `{key}` has shape {tuple(tensor.shape)} but config.json implies "
                f"{tuple(param.shape)} (n_embd={config.n_embd}, n_inner={config.n_inner}, "
                f"vocab_size={config.vocab_size}, n_positions={config.n_positions}, num_labels={config.num_labels})")
        state[key] = tensor.to(device=torch_device, dtype=torch_dtype).contiguous()
    leftover = [k for k in tensors if not k.startswith("score.")]  # score on an LM config: a head we don't use
    if leftover:
        raise ModelConfigError(f"{model_dir}: checkpoint tensors not in a GPT-2 of this config.json: {leftover[:5]}")

    model.load_state_dict(state, strict=False, assign=True)
    if tie:
        model.lm_head.weight = model.transformer.wte.weight
    model.eval().requires_grad_(False)
    if quantization == "int8":
        quantize_int8(model)
    elif quantization == "int4":
        quantize_int4(model)
    try:
        linears = resolve_linear_backend(linear_backend, torch_device, torch_dtype, quantization)
    except ValueError as e:
        raise ModelConfigError(str(e)) from None
    if linears == "onednn":
        use_onednn(model)

    tokenizer = load_tokenizer(model_dir)
    card = ModelCard.load(model_dir) or ModelCard.default(
        [config.id2label.get(i, f"LABEL_{i}") for i in range(config.num_labels)] if config.is_classifier else None)
    return LoadedModel(name=name or model_dir.name, path=model_dir, model=model, config=config, tokenizer=tokenizer,
                       card=card, dtype=torch_dtype, device=torch_device, quantization=quantization)


def load_tokenizer(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)
