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
`LoRAAdapterError` (a ValueError naming the file and the field) and nothing else happens. An adapter
directory is operator-supplied data, read while the server serves, so reading it is bounded: every file
it opens resolves inside a root directory (no symlink leads out), the JSON files are size-capped, and
PEFT's rank_pattern/alpha_pattern regexes run on RE2 (linear time: no pattern can backtrack for minutes)
under a cap on their number and length. Any file, however malformed, ends as a LoRAAdapterError.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import re2
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from lmservice.model.card import CARD_FILE, ModelCard

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

# Bounds on what one adapter directory may make the server do (real PEFT configs are a few KB).
MAX_JSON_FILE_BYTES = 1 << 20  # adapter_config.json, lmservice.json
MAX_PATTERN_KEYS = 1024  # entries of rank_pattern or alpha_pattern (a GPT-2 has 4 * n_layer + 2 modules)
MAX_PATTERN_CHARS = 256  # one rank_pattern/alpha_pattern key (PEFT writes module names: ~40)
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a bad pattern is the user's error, reported as such, not logged by RE2
_RE2_OPTIONS.max_mem = 8 << 20  # per compiled pattern (RE2's default): a bigger program is refused

# Error messages show a value from a file this short, whatever its size or depth.
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 80
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict = 3, 6, 6

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
    """A broken adapter directory (an HTTP 400 when added at runtime); the message names file and field,
    each shown short whatever the file held."""

    def __init__(self, path: Path, field: str, problem: str) -> None:
        super().__init__(f"{path}: {short(field) if len(field) > 80 else field}: {problem}")
        self.path = path
        self.field = field


def short(value: Any) -> str:
    """repr() of a value read from a file, cut to a few dozen characters and a few levels of nesting."""
    return _SHORT.repr(value)


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
    path: Path, targets: LoRATargets, max_lora_rank: int, name: str | None = None, root: Path | None = None
) -> LoRAAdapter:
    """Read and validate a PEFT LoRA directory against the base described by `targets`. Every file read
    must resolve inside `root` (default: the directory itself)."""
    path = Path(path)
    if not path.is_dir():
        raise LoRAAdapterError(path, "directory", "not a directory")
    root = Path(root or path).resolve()
    config_file = adapter_file(path, ADAPTER_CONFIG_FILE, root)
    if config_file is None:
        raise LoRAAdapterError(path / ADAPTER_CONFIG_FILE, "file", "missing (not a PEFT adapter directory)")
    config = read_json_object(config_file, path / ADAPTER_CONFIG_FILE)
    weights_file, tensors = _read_tensors(path, root)
    loader = _AdapterParser(config, path / ADAPTER_CONFIG_FILE, weights_file, targets, max_lora_rank)
    weights, score_weight, score_bias = loader.parse(tensors)
    return LoRAAdapter(name or path.name, path, weights, score_weight, score_bias)


def read_adapter(
    path: Path, targets: LoRATargets, max_lora_rank: int, name: str | None = None, root: Path | None = None
) -> tuple[LoRAAdapter, ModelCard]:
    """An adapter directory as the server serves it: its weights (`load_lora_adapter`) and its model card,
    `lmservice.json` under the same bounds, or when it has none the default card (a classifier when it
    carries a score head, labelled LABEL_i). A pure function of the files: any thread may call it."""
    adapter = load_lora_adapter(path, targets, max_lora_rank, name, root)
    path = Path(path)
    card_file = adapter_file(path, CARD_FILE, Path(root or path).resolve())
    if card_file is None:
        num_labels = adapter.score_weight.shape[0] if adapter.score_weight is not None else 0
        return adapter, ModelCard.default([f"LABEL_{i}" for i in range(num_labels)] or None)
    try:
        card = ModelCard.model_validate(read_json_object(card_file, path / CARD_FILE))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'card'}: {e['msg']}" for e in exc.errors()[:3])
        raise LoRAAdapterError(path / CARD_FILE, "card", f"invalid model card ({short(problems)})") from None
    return adapter, card


def adapter_file(directory: Path, filename: str, root: Path) -> Path | None:
    """`directory/filename` with its symlinks resolved, None when there is no such entry; LoRAAdapterError
    when it resolves outside `root` (a resolved directory) or is not a regular file. The caller opens the
    resolved path, so what it reads is what was checked."""
    path = directory / filename
    if not path.is_symlink() and not path.exists():
        return None
    try:
        real = path.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise LoRAAdapterError(path, "file", f"cannot be resolved ({type(exc).__name__})") from None
    if real != root and root not in real.parents:
        raise LoRAAdapterError(path, "file", "is a link to a file outside the adapter's directory tree")
    if not real.is_file():
        raise LoRAAdapterError(path, "file", "not a regular file (a dangling link, a directory, a device)")
    return real


def read_json_object(real_file: Path, shown_as: Path) -> dict[str, Any]:
    """The JSON object in `real_file`, at most MAX_JSON_FILE_BYTES; every way it can be malformed (too big,
    not UTF-8, not JSON, nested past the parser's depth, integers past Python's digit limit, not an
    object) is a LoRAAdapterError naming `shown_as`."""
    try:
        with open(real_file, "rb") as f:
            data = f.read(MAX_JSON_FILE_BYTES + 1)
    except OSError as exc:
        raise LoRAAdapterError(shown_as, "file", f"unreadable ({exc.strerror})") from None
    if len(data) > MAX_JSON_FILE_BYTES:
        raise LoRAAdapterError(shown_as, "file", f"larger than {MAX_JSON_FILE_BYTES} bytes")
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise LoRAAdapterError(shown_as, "file", "not UTF-8 text") from None
    except RecursionError:
        raise LoRAAdapterError(shown_as, "file", "JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and an integer past sys.get_int_max_str_digits()
        raise LoRAAdapterError(shown_as, "file", f"not valid JSON ({short(str(exc))})") from None
    if not isinstance(value, dict):
        raise LoRAAdapterError(shown_as, "file", "must hold a JSON object")
    return value


def _read_tensors(path: Path, root: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    safetensors_file, bin_file = path / ADAPTER_WEIGHTS_FILE, path / ADAPTER_WEIGHTS_BIN_FILE
    weights_file, real = safetensors_file, adapter_file(path, ADAPTER_WEIGHTS_FILE, root)
    if real is None:  # older PEFT wrote only the .bin
        weights_file, real = bin_file, adapter_file(path, ADAPTER_WEIGHTS_BIN_FILE, root)
    if real is None:
        raise LoRAAdapterError(
            safetensors_file, "file", f"missing (nor is there an {ADAPTER_WEIGHTS_BIN_FILE})"
        )
    try:
        if weights_file == safetensors_file:
            tensors = load_file(real, device="cpu")
        else:
            tensors = torch.load(real, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (any reader failure is a broken file to the user)
        raise LoRAAdapterError(weights_file, "file", f"unreadable ({type(exc).__name__}: {short(str(exc))})") from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise LoRAAdapterError(weights_file, "file", "must map tensor names to tensors")
    return weights_file, tensors


def pattern_values(patterns: dict[str, Any], module_names: list[str], default: Any) -> dict[str, Any]:
    r"""PEFT's rank_pattern/alpha_pattern rule for each module: a key applies to the module whose full name
    ends in it (`re.match(rf"(.*\.)?({key})$", name)`), the first such key wins, else `default`. Run on
    RE2, whose matching time is linear in the name; each key is compiled once. A key RE2 cannot compile
    (a syntax error; a backreference or lookaround, which RE2 leaves out to stay linear) raises ValueError."""
    values = dict.fromkeys(module_names, default)
    unmatched = set(module_names)
    for key, value in patterns.items():
        if not unmatched:
            break
        try:
            pattern = re2.compile(rf"(.*\.)?({key})$", _RE2_OPTIONS)
        except re2.error as exc:
            text = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
            raise ValueError(
                f"key {short(key)} is not a pattern lmservice runs: {text.split(':', 1)[0][:80]}; patterns run "
                "on RE2 (linear time), which has no backreferences or lookarounds"
            ) from None
        for module_name in [n for n in module_names if n in unmatched]:
            if pattern.match(module_name):
                values[module_name] = value
                unmatched.discard(module_name)
    return values


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
        """Every field read later has its type checked here, so nothing past this point meets a value
        it cannot handle; a message shows a field's value short (`short`)."""
        config = self.config
        if config.get("peft_type") != "LORA":
            raise self._fail_config("peft_type", f"{short(config.get('peft_type'))} is not LORA")
        r, alpha = config.get("r"), config.get("lora_alpha", 8)
        if not _is_positive_int(r):
            raise self._fail_config("r", f"{short(r)} is not a positive integer")
        if not _is_finite_number(alpha):
            raise self._fail_config("lora_alpha", f"{short(alpha)} is not a finite number")
        if config.get("bias", "none") != "none":
            raise self._fail_config(
                "bias", f"{short(config['bias'])}: only 'none' is served (base biases are frozen)"
            )
        if not isinstance(config.get("use_rslora", False), bool):
            raise self._fail_config("use_rslora", f"{short(config['use_rslora'])} is not true or false")
        for field in UNSUPPORTED_FIELDS:
            if config.get(field):
                raise self._fail_config(field, f"{short(config[field])}: this LoRA variant is not served")
        init = config.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(BASE_MODIFYING_INITS):
            raise self._fail_config(
                "init_lora_weights", f"{short(init)} changes the base weights; convert it to plain LoRA"
            )
        self.rank_pattern = self._check_pattern("rank_pattern", _is_positive_int, "a positive integer")
        self.alpha_pattern = self._check_pattern("alpha_pattern", _is_finite_number, "a finite number")
        self._check_target_modules(config.get("target_modules"))
        modules_to_save = config.get("modules_to_save") or []
        if not isinstance(modules_to_save, list) or not all(isinstance(m, str) for m in modules_to_save):
            raise self._fail_config("modules_to_save", f"{short(modules_to_save)} is not a list of module names")
        unknown = set(modules_to_save) - SERVABLE_MODULES_TO_SAVE
        if unknown:
            raise self._fail_config("modules_to_save", f"{short(sorted(unknown))}: only a `score` head is served")

    def _check_pattern(self, field: str, is_valid: Any, expected: str) -> dict[str, Any]:
        patterns = self.config.get(field) or {}
        if not isinstance(patterns, dict):
            raise self._fail_config(field, "must be an object")
        if len(patterns) > MAX_PATTERN_KEYS:
            raise self._fail_config(field, f"{len(patterns)} entries, at most {MAX_PATTERN_KEYS} are read")
        for key, value in patterns.items():
            if len(key) > MAX_PATTERN_CHARS:
                raise self._fail_config(field, f"key {short(key)} is over {MAX_PATTERN_CHARS} characters")
            if not is_valid(value):
                raise self._fail_config(field, f"{short(key)}: {short(value)} is not {expected}")
        return patterns

    def _check_target_modules(self, target_modules: Any) -> None:
        """List entries must name GPT-2 projections or embeddings (PEFT matches a name or a dotted suffix);
        a regex string or "all-linear" is left to the tensor checks."""
        if target_modules is None or isinstance(target_modules, str):
            return
        if not isinstance(target_modules, list):
            raise self._fail_config("target_modules", f"{short(target_modules)} is not a list or a string")
        names = [f"transformer.{key}" for key in self.shapes]
        for entry in target_modules:
            if not isinstance(entry, str) or not any(name == entry or name.endswith(f".{entry}") for name in names):
                raise self._fail_config(
                    "target_modules", f"{short(entry)} is not a module lmservice adapts (c_attn, c_proj, c_fc, wte, wpe)"
                )

    def _module_patterns(self, peft_names: list[str]) -> tuple[dict[str, int], dict[str, float]]:
        """Each module's rank and alpha under rank_pattern / alpha_pattern (`pattern_values`)."""
        found = []
        for field, patterns, default in (("rank_pattern", self.rank_pattern, self.config["r"]),
                                         ("alpha_pattern", self.alpha_pattern, self.config.get("lora_alpha", 8))):
            try:
                found.append(pattern_values(patterns, peft_names, default))
            except ValueError as exc:
                raise self._fail_config(field, str(exc)) from None
        return found[0], found[1]

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
        ranks, alphas = self._module_patterns(sorted(set(peft_names.values())))
        weights = {
            key: self._module_weights(key, peft_names[key], pair, ranks[peft_names[key]], alphas[peft_names[key]])
            for key, pair in sorted(pairs.items())
        }
        score_weight, score_bias = self._score_head(score)
        return weights, score_weight, score_bias

    def _module_weights(self, key: str, peft_name: str, pair: dict[str, torch.Tensor], r: int, alpha: float):
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
        if a.dim() != 2 or tuple(a.shape) != (r, in_features):
            raise self._fail_weights(
                tensor_key.format("A"), f"shape {tuple(a.shape)}, expected (r={short(r)}, in_features={in_features})"
            )
        if b.dim() != 2 or tuple(b.shape) != (out_features, r):
            raise self._fail_weights(
                tensor_key.format("B"),
                f"shape {tuple(b.shape)}, expected (out_features={out_features}, r={short(r)})",
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


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_finite_number(value: Any) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer past a float's range
        return False
