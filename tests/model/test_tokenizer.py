"""lmservice/model/tokenizer.py (the server's tokenizer, without transformers) against transformers'
AutoTokenizer on the same directories: ids, text, special tokens and chat prompts are the same."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lmservice.model.config import ModelConfigError
from lmservice.model.tokenizer import Tokenizer
from tests.helpers import build_tokenizer

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["once upon a time", "  two  spaces, tabs\tand\nnewlines\n", "Zwei Männer spielen Fußball. ☃ 😀",
         "<|endoftext|>after the end", "", "1234567890 !?@#$%^&*()", "x" * 300]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] | trim }}{{ eos_token }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    fast = root / "fast"
    hf = build_tokenizer(1000)
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(fast)
    legacy = root / "legacy"  # a stock GPT-2 checkpoint's files: vocab.json + merges.txt, no tokenizer.json
    legacy.mkdir()
    hf.backend_tokenizer.model.save(str(legacy))
    (legacy / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    (legacy / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    return {"shipped base": ROOT / "models" / "base", "tokenizer.json": fast, "vocab.json + merges.txt": legacy}


@pytest.mark.parametrize("which", ["shipped base", "tokenizer.json", "vocab.json + merges.txt"])
def test_same_ids_text_and_special_tokens_as_transformers(dirs, which):
    ours, theirs = Tokenizer.from_dir(dirs[which]), AutoTokenizer.from_pretrained(dirs[which])
    assert ours.eos_token_id == theirs.eos_token_id is not None
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=False)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip), text
    for token_id in (0, 5, 255, ours.eos_token_id):
        assert ours.convert_ids_to_tokens(token_id) == theirs.convert_ids_to_tokens(token_id)


def test_chat_template_renders_as_transformers_does(dirs):
    ours, theirs = Tokenizer.from_dir(dirs["tokenizer.json"]), AutoTokenizer.from_pretrained(dirs["tokenizer.json"])
    messages = [{"role": "system", "content": " be brief "}, {"role": "user", "content": "hi"}]
    for gen in (True, False):
        assert ours.apply_chat_template(messages, add_generation_prompt=gen) == \
            theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert Tokenizer.from_dir(dirs["shipped base"]).chat_template is None  # GPT-2 has none: the plain template


def test_a_template_error_is_a_value_error_and_a_dir_without_files_is_refused(dirs, tmp_path):
    tok = Tokenizer.from_dir(dirs["tokenizer.json"])
    tok.chat_template, tok._template = "{{ raise_exception('no system role') }}", None
    with pytest.raises(ValueError, match="no system role"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])
    with pytest.raises(ModelConfigError, match="no tokenizer files"):
        Tokenizer.from_dir(tmp_path)
