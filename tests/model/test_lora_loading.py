"""lmservice/model/lora.py: PEFT adapter directories, loaded and served through the store and the torch
kernel, give what PEFT's own modules give; broken directories are refused with the file and field named."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmservice.kernels.lora import LoRAMapping, add_lora_embedding_torch, add_lora_torch
from lmservice.model.lora import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    LoRAAdapterError,
    LoRATargets,
    load_lora_adapter,
)
from lmservice.model.lora_store import LoRAStore

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

MAX_LORA_RANK = 8
CONFIG = dict(
    n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=100,
    num_labels=3, pad_token_id=0, bos_token_id=1, eos_token_id=1,
)  # fmt: skip
# Different ranks and targets; "rslora" also has per-module rank and alpha (PEFT's rank_pattern/alpha_pattern).
SPECS = {
    "attn": dict(r=4, lora_alpha=8, target_modules=["c_attn"]),
    "all": dict(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc", "wte"]),
    "rslora": dict(
        r=2, lora_alpha=4, use_rslora=True, target_modules=["c_fc", "mlp.c_proj", "wpe"],
        rank_pattern={"h.1.mlp.c_fc": 3}, alpha_pattern={"c_proj": 5},
    ),
}  # fmt: skip


def randomize_lora(peft_model, seed):
    """PEFT initializes lora_B to zero: an untrained adapter would add nothing and prove nothing."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)


@pytest.fixture(scope="module")
def lm_adapters(tmp_path_factory):
    """A tiny random GPT2LMHeadModel, the SPECS adapters saved by PEFT, and one PeftModel holding them all."""
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG)).eval()
    root = tmp_path_factory.mktemp("adapters")
    for seed, (name, spec) in enumerate(SPECS.items()):
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**spec))
        randomize_lora(model, seed)
        model.save_pretrained(root / name)
    names = list(SPECS)
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), root / names[0], adapter_name=names[0])
    for name in names[1:]:
        reference.load_adapter(root / name, adapter_name=name)
    return base, root, reference.eval()


@pytest.fixture(scope="module")
def cls_adapter(tmp_path_factory):
    """A classification adapter: LoRA on c_attn and a trained `score` head saved via modules_to_save."""
    torch.manual_seed(1)
    base = transformers.GPT2ForSequenceClassification(transformers.GPT2Config(**CONFIG)).eval()
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], task_type="SEQ_CLS", modules_to_save=["score"]
    )
    model = peft.get_peft_model(base, config)
    randomize_lora(model, 7)
    with torch.no_grad():
        model.base_model.model.score.modules_to_save["default"].weight.normal_()
    path = tmp_path_factory.mktemp("cls") / "sentiment"
    model.save_pretrained(path)
    return path, model.eval()


def targets():
    return LoRATargets.from_config(transformers.GPT2Config(**CONFIG))


def peft_module(peft_model, key):
    return peft_model.base_model.model.transformer.get_submodule(key)


def test_targets_follow_the_gpt2_config():
    shapes = targets().shapes()
    assert len(shapes) == 4 * CONFIG["n_layer"] + 2
    assert shapes["wte"] == (100, 32) and shapes["wpe"] == (64, 32)  # (rows, n_embd)
    assert shapes["h.1.attn.c_attn"] == (32, 96)
    assert shapes["h.0.attn.c_proj"] == (32, 32)
    assert shapes["h.0.mlp.c_fc"] == (32, 128)  # n_inner None -> 4 * n_embd
    assert shapes["h.1.mlp.c_proj"] == (128, 32)
    assert LoRATargets.from_config(transformers.GPT2Config(**{**CONFIG, "n_inner": 40})).shapes()[
        "h.0.mlp.c_fc"
    ] == (32, 40)


def test_loaded_ranks_and_targets(lm_adapters):
    _, root, _ = lm_adapters
    adapter = load_lora_adapter(root / "rslora", targets(), MAX_LORA_RANK)
    assert adapter.name == "rslora" and adapter.score_weight is None
    assert sorted(adapter.weights) == ["h.0.mlp.c_fc", "h.0.mlp.c_proj", "h.1.mlp.c_fc", "h.1.mlp.c_proj", "wpe"]
    assert adapter.weights["wpe"][0].shape == (2, 64) and adapter.weights["wpe"][1].shape == (32, 2)
    assert adapter.weights["h.1.mlp.c_fc"][0].shape == (3, 32) and adapter.rank == 3
    assert adapter.weights["h.0.mlp.c_proj"][1].shape == (32, 2)


def test_mixed_batch_matches_peft_module_by_module(lm_adapters):
    """Tokens of three adapters (ranks 4, 8, 2-3) and of the base in one batch: each projection's (and
    embedding's) base output + add_lora equals the PEFT module's output under that token's adapter."""
    _, root, reference = lm_adapters
    store = LoRAStore(targets(), max_loras=3, max_lora_rank=MAX_LORA_RANK)
    for name in SPECS:
        store.load(name, root / name)
    seq_names = ["attn", None, "all", "rslora", "attn", "all"]
    seq_slots = store.acquire(seq_names)
    query_lens = [3, 2, 1, 4, 1, 2]
    mapping = LoRAMapping.from_seq_slots(seq_slots, query_lens, "cpu")
    token_names = [n for n, q in zip(seq_names, query_lens, strict=True) for _ in range(q)]
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for key, (in_features, _) in targets().shapes().items():
            module = peft_module(reference, key)
            base_layer = module.get_base_layer()
            embedding = isinstance(base_layer, torch.nn.Embedding)
            if embedding:  # in_features is its number of rows: the input is row indices
                x = torch.randint(0, in_features, (len(token_names),), generator=gen)
            else:
                x = torch.randn(len(token_names), in_features, generator=gen)
            expected = base_layer(x)
            for name in SPECS:
                reference.set_adapter(name)
                rows = [t for t, n in enumerate(token_names) if n == name]
                expected[rows] = module(x)[rows]
            y = base_layer(x)
            add = add_lora_embedding_torch if embedding else add_lora_torch
            if store.lora_weights(key) is not None:
                add(y, x, *store.lora_weights(key), mapping)
            torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5, msg=f"{key}")
            assert not torch.equal(expected, base_layer(x)), "every module is targeted by some adapter"


def test_classification_adapter_brings_its_score_head(cls_adapter):
    path, model = cls_adapter
    adapter = load_lora_adapter(path, targets(), MAX_LORA_RANK)
    trained = model.base_model.model.score.modules_to_save["default"].weight
    assert adapter.score_weight.shape == (3, 32)
    assert torch.equal(adapter.score_weight, trained)
    assert not torch.equal(adapter.score_weight, model.base_model.model.score.original_module.weight)
    assert adapter.score_bias is None
    # its LoRA on a GPT2ForSequenceClassification base loads and computes as PEFT's does
    x = torch.randn(5, 32)
    a, b = adapter.weights["h.1.attn.c_attn"]
    module = peft_module(model, "h.1.attn.c_attn")
    with torch.no_grad():
        y = module.get_base_layer()(x)
        add_lora_torch(y, x, a[None], b[None], LoRAMapping.from_token_slots([0] * 5, "cpu"))
        torch.testing.assert_close(y, module(x), rtol=1e-5, atol=1e-5)


def test_adapter_on_a_bare_gpt2model_base_loads(tmp_path):
    """PEFT on GPT2Model names modules without the `transformer.` prefix."""
    base = transformers.GPT2Model(transformers.GPT2Config(**CONFIG))
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=2, target_modules=["c_proj"], rank_pattern={"h.1.attn.c_proj": 4})
    )
    randomize_lora(model, 5)
    model.save_pretrained(tmp_path / "bare")
    assert any(
        k.startswith("base_model.model.h.0.") for k in load_file(tmp_path / "bare" / ADAPTER_WEIGHTS_FILE)
    )
    adapter = load_lora_adapter(tmp_path / "bare", targets(), MAX_LORA_RANK)
    assert sorted(adapter.weights) == [
        "h.0.attn.c_proj",
        "h.0.mlp.c_proj",
        "h.1.attn.c_proj",
        "h.1.mlp.c_proj",
    ]
    assert adapter.weights["h.1.attn.c_proj"][0].shape == (4, 32) and adapter.weights["h.1.mlp.c_proj"][
        0
    ].shape == (2, 128)
    torch.testing.assert_close(
        adapter.weights["h.0.attn.c_proj"][0],
        model.base_model.model.h[0].attn.c_proj.lora_A["default"].weight,
    )


def test_score_head_under_modules_to_save_key_is_accepted(cls_adapter, tmp_path):
    path, _ = cls_adapter
    broken = copy_adapter(path, tmp_path)
    tensors = load_file(path / ADAPTER_WEIGHTS_FILE)
    tensors["base_model.model.score.modules_to_save.weight"] = tensors.pop("base_model.model.score.weight")
    save_file(tensors, broken / ADAPTER_WEIGHTS_FILE)
    assert load_lora_adapter(broken, targets(), MAX_LORA_RANK).score_weight.shape == (3, 32)


# --- broken directories --------------------------------------------------------------------------


def copy_adapter(path, tmp_path):
    target = tmp_path / "adapter"
    shutil.copytree(path, target)
    return target


def edit_config(path, **changes):
    config = json.loads((path / ADAPTER_CONFIG_FILE).read_text())
    config.update(changes)
    (path / ADAPTER_CONFIG_FILE).write_text(json.dumps(config))


def edit_tensors(path, edit):
    tensors = load_file(path / ADAPTER_WEIGHTS_FILE)
    edit(tensors)
    save_file(tensors, path / ADAPTER_WEIGHTS_FILE)


KEY = "base_model.model.transformer.h.0.attn.c_attn.lora_{}.weight"
BROKEN = {
    "missing_config": (lambda p: (p / ADAPTER_CONFIG_FILE).unlink(), ADAPTER_CONFIG_FILE, "file"),
    "missing_weights": (lambda p: (p / ADAPTER_WEIGHTS_FILE).unlink(), ADAPTER_WEIGHTS_FILE, "file"),
    "bad_json": (lambda p: (p / ADAPTER_CONFIG_FILE).write_text("{"), ADAPTER_CONFIG_FILE, "file"),
    "corrupt_weights": (lambda p: (p / ADAPTER_WEIGHTS_FILE).write_bytes(b"junk"), ADAPTER_WEIGHTS_FILE, "file"),
    "not_lora": (lambda p: edit_config(p, peft_type="IA3"), ADAPTER_CONFIG_FILE, "peft_type"),
    "bias_all": (lambda p: edit_config(p, bias="all"), ADAPTER_CONFIG_FILE, "bias"),
    "dora": (lambda p: edit_config(p, use_dora=True), ADAPTER_CONFIG_FILE, "use_dora"),
    "unknown_target": (lambda p: edit_config(p, target_modules=["c_attn", "ln_f"]), ADAPTER_CONFIG_FILE, "target_modules"),
    "unservable_module_to_save": (lambda p: edit_config(p, modules_to_save=["ln_f"]), ADAPTER_CONFIG_FILE, "modules_to_save"),
    "rank_over_max": (lambda p: edit_config(p, r=16), ADAPTER_WEIGHTS_FILE, KEY.format("A")),
    "config_rank_disagrees": (lambda p: edit_config(p, r=6), ADAPTER_WEIGHTS_FILE, KEY.format("A")),
    "wrong_in_features": (
        lambda p: edit_tensors(p, lambda t: t.update({KEY.format("A"): torch.zeros(8, 48)})),
        ADAPTER_WEIGHTS_FILE, KEY.format("A"),
    ),
    "wrong_out_features": (
        lambda p: edit_tensors(p, lambda t: t.update({KEY.format("B"): torch.zeros(64, 8)})),
        ADAPTER_WEIGHTS_FILE, KEY.format("B"),
    ),
    "missing_partner": (lambda p: edit_tensors(p, lambda t: t.pop(KEY.format("B"))), ADAPTER_WEIGHTS_FILE, KEY.format("B")),
    "layer_past_base": (
        lambda p: edit_tensors(p, lambda t: t.update({KEY.replace("h.0", "h.5").format("A"): torch.zeros(8, 32)})),
        ADAPTER_WEIGHTS_FILE, "h.5",
    ),
    "unknown_tensor": (
        lambda p: edit_tensors(p, lambda t: t.update({"base_model.model.transformer.ln_f.lora_A.weight": torch.zeros(8, 32)})),
        ADAPTER_WEIGHTS_FILE, "ln_f.lora_A",
    ),
    "embedding_rows_not_the_vocab": (
        lambda p: edit_tensors(p, lambda t: t.update({"base_model.model.transformer.wte.lora_embedding_A": torch.zeros(8, 99)})),
        ADAPTER_WEIGHTS_FILE, "wte.lora_embedding_A",
    ),
    "nan_weights": (
        lambda p: edit_tensors(p, lambda t: t[KEY.format("B")].fill_(float("nan"))),
        ADAPTER_WEIGHTS_FILE, KEY.format("B"),
    ),
    "score_listed_but_missing": (lambda p: edit_config(p, modules_to_save=["score"]), ADAPTER_WEIGHTS_FILE, "score.weight"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_dir_is_refused_naming_file_and_field(case, lm_adapters, tmp_path):
    _, root, _ = lm_adapters
    path = copy_adapter(root / "all", tmp_path)
    breaks, file_name, field = BROKEN[case]
    breaks(path)
    store = LoRAStore(targets(), max_loras=2, max_lora_rank=MAX_LORA_RANK)
    store.load("attn", root / "attn")
    buffers_before = {
        key: tuple(t.clone() for t in store.lora_weights(key))
        for key in targets().shapes()
        if store.lora_weights(key)
    }

    with pytest.raises(LoRAAdapterError) as info:
        store.load("broken", path)

    assert isinstance(info.value, ValueError)
    assert file_name in str(info.value) and field in str(info.value)
    assert store.names() == ["attn"] and store.rank == 4
    for key, (lora_a, lora_b) in buffers_before.items():
        assert torch.equal(store.lora_weights(key)[0], lora_a) and torch.equal(
            store.lora_weights(key)[1], lora_b
        )
    assert all(store.lora_weights(key) is None for key in targets().shapes() if key not in buffers_before)


def test_not_a_directory_is_refused(tmp_path):
    with pytest.raises(LoRAAdapterError, match="not a directory"):
        load_lora_adapter(tmp_path / "nope", targets(), MAX_LORA_RANK)


def test_adapter_for_another_base_size_is_refused(tmp_path):
    other = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**CONFIG, "n_embd": 48}))
    peft.get_peft_model(other, peft.LoraConfig(r=4, target_modules=["c_attn"])).save_pretrained(
        tmp_path / "big"
    )
    with pytest.raises(LoRAAdapterError, match=r"in_features=32"):
        load_lora_adapter(tmp_path / "big", targets(), MAX_LORA_RANK)
