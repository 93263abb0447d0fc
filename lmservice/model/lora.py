"""Loading PEFT LoRA adapter directories made for a GPT-2-family base.

A PEFT directory holds adapter_config.json and adapter_model.safetensors (or adapter_model.bin) with keys
like `base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`. PEFT wraps GPT-2's Conv1D projections in
its `lora.Linear`, whose lora_A is nn.Linear(in, r) and lora_B is nn.Linear(r, out): the stored weights are
A (r, in_features) and B (out_features, r) whatever `fan_in_fan_out` says (that flag only transposes the
merged delta), and the forward adds `lora_B(lora_A(x)) * scaling` to the base output. We fold `scaling`
into B, so an adapter here is exactly the per-module pair lmservice/kernels/lora.py computes with.

An adapter may also target the embeddings `wte` and `wpe` (PEFT's lora.Embedding: lora_embedding_A
(r, num_embeddings), lora_embedding_B (embedding_dim, r)). They are kept in the same (A, B) layout, the row
index standing in for a one-hot input, and only the input embedding changes: GPT-2's LM head, tied to
`wte`, keeps the base's weights, as under PEFT.

Loading is a pure function of the directory and the base's shapes: a broken directory raises
`LoRAAdapterError` (a ValueError naming the file and the field) and nothing else happens.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN_FILE = "adapter_model.bin"  # older PEFT default; read with torch.load(weights_only=True)

# The GPT-2 projections an adapter may target, as named inside a block (`h.{i}.`).
LORA_MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
# The embeddings an adapter may target (PEFT's lora.Embedding): keyed by their own name.
EMBEDDING_MODULES = ("wte", "wpe")
SCORE_MODULE = "score"  # the classification head of GPT2ForSequenceClassification
# modules_to_save entries we can serve: PEFT adds "classifier" and "score" for task_type SEQ_CLS
SERVABLE_MODULES_TO_SAVE = {"score", "classifier"}

# PEFT config fields that change the forward (or the base weights) beyond plain LoRA: refused when set.
UNSUPPORTED_FIELDS = (
    "use_dora", "lora_bias", "alora_invocation_tokens", "layer_replication", "trainable_token_indices",
    "target_parameters", "use_qalora", "use_bdlora", "arrow_config", "kasa_config", "monteclora_config",
)  # fmt: skip
BASE_MODIFYING_INITS = ("pissa", "corda", "olora", "loftq", "mica")  # they rewrite the base weights

_LORA_KEY = re.compile(
    r"base_model\.model\.(?P<module>(?:transformer\.)?h\.(?P<layer>\d+)\.(?P<kind>"
    + "|".join(re.escape(m) for m in LORA_MODULES)
    + r"))\.lora_(?P<ab>[AB])\.weight"
)
# PEFT stores an embedding's factors as bare parameters: lora_embedding_A (r, num_embeddings) and
# lora_embedding_B (embedding_dim, r); the delta of row i is B @ A[:, i] * scaling.
_EMBEDDING_KEY = re.compile(
    r"base_model\.model\.(?P<module>(?:transformer\.)?(?P<kind>wte|wpe))\.lora_embedding_(?P<ab>[AB])"
)
_SCORE_KEY = re.compile(r"base_model\.model\.score\.(?:modules_to_save\.)?(?P<param>weight|bias)")


def lora_module_key(layer: int, module: str) -> str:
    """The name lmservice gives a projection, e.g. `h.3.mlp.c_fc`."""
    return f"h.{layer}.{module}"


@dataclass(frozen=True)
class LoRATargets:
    """The modules of a GPT-2 base that an adapter may target, read from its config: the projections, and
    the embeddings when vocab_size / n_positions are known."""

    n_layer: int
    n_embd: int
    n_inner: int
    vocab_size: int | None = None
    n_positions: int | None = None

    @classmethod
    def from_config(cls, config: Any) -> LoRATargets:
        """Any object with GPT-2's config attributes (transformers' GPT2Config, or ours); n_inner None
        means 4 * n_embd as in GPT-2."""
        n_inner = getattr(config, "n_inner", None)
        return cls(config.n_layer, config.n_embd, n_inner if n_inner is not None else 4 * config.n_embd,
                   getattr(config, "vocab_size", None), getattr(config, "n_positions", None))

    def shapes(self) -> dict[str, tuple[int, int]]:
        """module key -> (in_features, out_features); an embedding's in_features is its number of rows
        (its input is a one-hot row index: the delta of index i is B @ A[:, i])."""
        e, inner = self.n_embd, self.n_inner
        per_module = {
            "attn.c_attn": (e, 3 * e),
            "attn.c_proj": (e, e),
            "mlp.c_fc": (e, inner),
            "mlp.c_proj": (inner, e),
        }
        shapes = {lora_module_key(i, m): per_module[m] for i in range(self.n_layer) for m in LORA_MODULES}
        for key, rows in (("wte", self.vocab_size), ("wpe", self.n_positions)):
            if rows is not None:
                shapes[key] = (rows, e)
        return shapes


class LoRAAdapterError(ValueError):
    """A broken adapter directory (an HTTP 400 when added at runtime); the message names file and field."""

    def __init__(self, path: Path, field: str, problem: str) -> None:
        super().__init__(f"{path}: {field}: {problem}")
        self.path = path
        self.field = field


@dataclass(frozen=True, eq=False)
class LoRAAdapter:
    """One adapter on the CPU, fp32, ready to be copied into device slots.

    Invariant: weights[key] = (A (r, in_features), B (out_features, r)) with the LoRA scaling folded into B,
    (in, out) the base's shapes for `key`, 1 <= r <= the max_lora_rank it was loaded under. Modules it
    does not target are absent. `score_weight` (num_labels, n_embd) is a classification adapter's head.
    """

    name: str
    path: Path
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    score_weight: torch.Tensor | None = None
    score_bias: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        """The largest rank over its modules (ranks may differ per module with PEFT's rank_pattern)."""
        return max(a.shape[0] for a, _ in self.weights.values())


def load_lora_adapter(
    path: Path, targets: LoRATargets, max_lora_rank: int, name: str | None = None
) -> LoRAAdapter:
    """Read and validate a PEFT LoRA directory against the base described by `targets`."""
    path = Path(path)
    if not path.is_dir():
        raise LoRAAdapterError(path, "directory", "not a directory")
    config = _read_config(path / ADAPTER_CONFIG_FILE)
    weights_file, tensors = _read_tensors(path)
    loader = _AdapterParser(config, path / ADAPTER_CONFIG_FILE, weights_file, targets, max_lora_rank)
    weights, score_weight, score_bias = loader.parse(tensors)
    return LoRAAdapter(name or path.name, path, weights, score_weight, score_bias)


def _read_config(config_file: Path) -> dict[str, Any]:
    if not config_file.is_file():
        raise LoRAAdapterError(config_file, "file", "missing (not a PEFT adapter directory)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoRAAdapterError(config_file, "file", f"unreadable JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise LoRAAdapterError(config_file, "file", "must hold a JSON object")
    return config


def _read_tensors(path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    safetensors_file, bin_file = path / ADAPTER_WEIGHTS_FILE, path / ADAPTER_WEIGHTS_BIN_FILE
    weights_file = safetensors_file if safetensors_file.is_file() or not bin_file.is_file() else bin_file
    if not weights_file.is_file():
        raise LoRAAdapterError(
            safetensors_file, "file", f"missing (nor is there an {ADAPTER_WEIGHTS_BIN_FILE})"
        )
    try:
        if weights_file == safetensors_file:
            tensors = load_file(weights_file, device="cpu")
        else:
            tensors = torch.load(weights_file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (any reader failure is a broken file to the user)
        raise LoRAAdapterError(weights_file, "file", f"unreadable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise LoRAAdapterError(weights_file, "file", "must map tensor names to tensors")
    return weights_file, tensors


def _pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern rule: a key applies to the module whose full name ends in it
    (as a regex, after a dot or from the start); the first such key wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


class _AdapterParser:
    """The validation of one directory: config fields first, then every tensor."""

    def __init__(
        self,
        config: dict[str, Any],
        config_file: Path,
        weights_file: Path,
        targets: LoRATargets,
        max_lora_rank: int,
    ) -> None:
        self.config, self.config_file, self.weights_file = config, config_file, weights_file
        self.targets, self.shapes, self.max_lora_rank = targets, targets.shapes(), max_lora_rank
        self._check_config()

    def _fail_config(self, field: str, problem: str) -> LoRAAdapterError:
        return LoRAAdapterError(self.config_file, field, problem)

    def _fail_weights(self, field: str, problem: str) -> LoRAAdapterError:
        return LoRAAdapterError(self.weights_file, field, problem)

    def _check_config(self) -> None:
        config = self.config
        if config.get("peft_type") != "LORA":
            raise self._fail_config("peft_type", f"{config.get('peft_type')!r} is not LORA")
        r, alpha = config.get("r"), config.get("lora_alpha", 8)
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise self._fail_config("r", f"{r!r} is not a positive integer")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise self._fail_config("lora_alpha", f"{alpha!r} is not a number")
        if config.get("bias", "none") != "none":
            raise self._fail_config(
                "bias", f"{config['bias']!r}: only 'none' is served (base biases are frozen)"
            )
        for field in UNSUPPORTED_FIELDS:
            if config.get(field):
                raise self._fail_config(field, f"{config[field]!r}: this LoRA variant is not served")
        init = config.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(BASE_MODIFYING_INITS):
            raise self._fail_config(
                "init_lora_weights", f"{init!r} changes the base weights; convert it to plain LoRA"
            )
        for field in ("rank_pattern", "alpha_pattern"):
            if not isinstance(config.get(field) or {}, dict):
                raise self._fail_config(field, "must be an object")
        self._check_target_modules(config.get("target_modules"))
        unknown = set(config.get("modules_to_save") or ()) - SERVABLE_MODULES_TO_SAVE
        if unknown:
            raise self._fail_config("modules_to_save", f"{sorted(unknown)}: only a `score` head is served")

    def _check_target_modules(self, target_modules: Any) -> None:
        """List entries must name GPT-2 projections or embeddings (PEFT matches a name or a dotted suffix);
        a regex string or "all-linear" is left to the tensor checks."""
        if target_modules is None or isinstance(target_modules, str):
            return
        names = [f"transformer.{key}" for key in self.shapes]
        for entry in target_modules:
            if not any(name == entry or name.endswith(f".{entry}") for name in names):
                raise self._fail_config(
                    "target_modules", f"{entry!r} is not a module lmservice adapts (c_attn, c_proj, c_fc, wte, wpe)"
                )

    def parse(self, tensors: dict[str, torch.Tensor]):
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        peft_names: dict[str, str] = {}
        score: dict[str, torch.Tensor] = {}
        for tensor_key, tensor in tensors.items():
            if match := _LORA_KEY.fullmatch(tensor_key):
                layer = int(match["layer"])
                if layer >= self.targets.n_layer:
                    raise self._fail_weights(
                        tensor_key, f"layer {layer} but the base has n_layer={self.targets.n_layer}"
                    )
                key = lora_module_key(layer, match["kind"])
                pairs.setdefault(key, {})[match["ab"]] = tensor
                peft_names[key] = match["module"]
            elif (match := _EMBEDDING_KEY.fullmatch(tensor_key)) and match["kind"] in self.shapes:
                key = match["kind"]
                pairs.setdefault(key, {})[match["ab"]] = tensor
                peft_names[key] = match["module"]
            elif match := _SCORE_KEY.fullmatch(tensor_key):
                score[match["param"]] = tensor
            else:
                raise self._fail_weights(
                    tensor_key,
                    "unexpected tensor (lmservice serves LoRA on c_attn, c_proj, c_fc, wte, wpe and a score head)",
                )
        if not pairs:
            raise self._fail_weights("tensors", "no LoRA weights (lora_A/lora_B) found")
        weights = {
            key: self._module_weights(key, peft_names[key], pair) for key, pair in sorted(pairs.items())
        }
        score_weight, score_bias = self._score_head(score)
        return weights, score_weight, score_bias

    def _module_weights(self, key: str, peft_name: str, pair: dict[str, torch.Tensor]):
        if key in EMBEDDING_MODULES:
            tensor_key = f"base_model.model.{peft_name}.lora_embedding_{{}}"
        else:
            tensor_key = f"base_model.model.{peft_name}.lora_{{}}.weight"
        for ab in "AB":
            if ab not in pair:
                raise self._fail_weights(
                    tensor_key.format(ab), "missing (its lora_A/lora_B partner is present)"
                )
        a, b = pair["A"], pair["B"]
        in_features, out_features = self.shapes[key]
        r = _pattern_value(self.config.get("rank_pattern") or {}, peft_name, self.config["r"])
        alpha = _pattern_value(
            self.config.get("alpha_pattern") or {}, peft_name, self.config.get("lora_alpha", 8)
        )
        if a.dim() != 2 or tuple(a.shape) != (r, in_features):
            raise self._fail_weights(
                tensor_key.format("A"), f"shape {tuple(a.shape)}, expected (r={r}, in_features={in_features})"
            )
        if b.dim() != 2 or tuple(b.shape) != (out_features, r):
            raise self._fail_weights(
                tensor_key.format("B"),
                f"shape {tuple(b.shape)}, expected (out_features={out_features}, r={r})",
            )
        if r > self.max_lora_rank:
            raise self._fail_weights(
                tensor_key.format("A"), f"rank {r} is over max_lora_rank={self.max_lora_rank}"
            )
        for ab, tensor in (("A", a), ("B", b)):
            if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
                raise self._fail_weights(tensor_key.format(ab), "must hold finite floating-point values")
        scaling = alpha / math.sqrt(r) if self.config.get("use_rslora", False) else alpha / r
        return a.float().contiguous(), (b.float() * scaling).contiguous()  # (r, in), (out, r)

    def _score_head(self, score: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        listed = SCORE_MODULE in (self.config.get("modules_to_save") or ())
        weight_key = "base_model.model.score.weight"
        if "weight" not in score:
            if listed or score:
                raise self._fail_weights(
                    weight_key, "missing although a score head is saved or listed in modules_to_save"
                )
            return None, None
        weight, bias = score["weight"], score.get("bias")
        if weight.dim() != 2 or weight.shape[1] != self.targets.n_embd:
            raise self._fail_weights(
                weight_key,
                f"shape {tuple(weight.shape)}, expected (num_labels, n_embd={self.targets.n_embd})",
            )
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise self._fail_weights(
                "base_model.model.score.bias", f"shape {tuple(bias.shape)}, expected ({weight.shape[0]},)"
            )
        return weight.float().contiguous(), None if bias is None else bias.float().contiguous()
