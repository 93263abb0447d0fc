"""Every bad input a user can give fails before training with exit code 2 and a message naming the problem."""

from __future__ import annotations

import json

import pytest


@pytest.fixture
def fails(train, capsys):
    """Run a job that must fail; return its one-line error (stderr)."""

    def run(*argv) -> str:
        capsys.readouterr()
        assert train(*argv) == 2
        err = capsys.readouterr().err
        line = err.strip().splitlines()[-1]
        assert line.startswith(f"lmservice train {argv[0]}: error: "), err
        return line

    return run


def test_missing_column(fails, base_dir, data_dir, tmp_path):
    err = fails("classify", "--base", base_dir, "--train", data_dir / "sentiment.tsv", "--text-column", "review",
                "--output", tmp_path / "out")
    assert "missing column(s) ['review']" in err and "['sentence', 'label']" in err


def test_missing_src_tgt_columns(fails, base_dir, tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps({"en": "a", "de": "b"}) + "\n")
    err = fails("translate", "--base", base_dir, "--train", bad, "--output", tmp_path / "out")
    assert "missing column(s) ['src', 'tgt']" in err


def test_labels_not_in_declared_set(fails, base_dir, data_dir, tmp_path):
    err = fails("classify", "--base", base_dir, "--train", data_dir / "sentiment.tsv", "--text-column", "sentence",
                "--labels", "pos", "neutral", "--output", tmp_path / "out")
    assert "label(s) ['neg'] not in the declared set ['pos', 'neutral']" in err


def test_empty_file(fails, base_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    err = fails("lm", "--base", base_dir, "--train", empty, "--output", tmp_path / "out")
    assert f"{empty}: file is empty" in err


def test_header_only_table_is_empty(fails, base_dir, tmp_path):
    header_only = tmp_path / "rows.tsv"
    header_only.write_text("sentence\tlabel\n")
    err = fails("classify", "--base", base_dir, "--train", header_only, "--text-column", "sentence",
                "--output", tmp_path / "out")
    assert "file is empty" in err


def test_missing_file(fails, base_dir, tmp_path):
    err = fails("lm", "--base", base_dir, "--train", tmp_path / "nope.txt", "--output", tmp_path / "out")
    assert "nope.txt: no such file" in err


def test_unaligned_parallel_files(fails, base_dir, tmp_path):
    (tmp_path / "a.en").write_text("one\ntwo\n")
    (tmp_path / "a.de").write_text("eins\n")
    err = fails("translate", "--base", base_dir, "--train-src", tmp_path / "a.en", "--train-tgt", tmp_path / "a.de",
                "--output", tmp_path / "out")
    assert "has 2 lines" in err and "not line-aligned" in err


def test_base_not_gpt2_family(fails, data_dir, tmp_path):
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    err = fails("lm", "--base", llama, "--train", data_dir / "text.txt", "--output", tmp_path / "out")
    assert "model_type is 'llama'" in err and "GPT-2-family" in err and str(llama / "config.json") in err


def test_base_without_config(fails, data_dir, tmp_path):
    err = fails("lm", "--base", tmp_path, "--train", data_dir / "text.txt", "--output", tmp_path / "out")
    assert "config.json: no such file" in err


def test_lora_target_that_does_not_exist(fails, base_dir, data_dir, tmp_path):
    err = fails("lm", "--base", base_dir, "--train", data_dir / "text.txt", "--lora", "--lora-targets", "q_proj",
                "--output", tmp_path / "out")
    assert "LoRA target(s) ['q_proj'] do not exist" in err and "c_attn" in err


def test_lora_extract_without_lora(fails, base_dir, data_dir, tmp_path):
    err = fails("lm", "--base", base_dir, "--train", data_dir / "text.txt", "--lora-extract", "--output", tmp_path / "o")
    assert "--lora-extract" in err and "--lora" in err
    assert not (tmp_path / "o").exists()


def test_output_exists(fails, base_dir, data_dir, tmp_path):
    (tmp_path / "out").mkdir()
    err = fails("lm", "--base", base_dir, "--train", data_dir / "text.txt", "--output", tmp_path / "out")
    assert "already exists" in err and "--overwrite" in err


def test_template_without_placeholder(fails, base_dir, data_dir, tmp_path):
    err = fails("translate", "--base", base_dir, "--train", data_dir / "pairs.jsonl", "--prompt-template", "EN->DE:",
                "--output", tmp_path / "out")
    assert "must contain {text}" in err
