"""Loading local training data with `datasets`, and the checks that fail before training starts.

Formats by file suffix: .txt (plain text), .csv, .tsv, .jsonl/.json, .parquet.
Every user-caused problem (no file, empty file, missing column, unknown label)
raises `DataError` with the file and the column in the message.

Text is repaired with ftfy as it is loaded (`fix=True`, the jobs' default; `--no-fix-text` turns it
off): mojibake such as "â€™" for "’" (UTF-8 read as Windows-1252 somewhere upstream), HTML entities
and control characters. A model learns whatever bytes it reads, so text left broken here comes
back in its outputs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import datasets
import ftfy
from datasets import Dataset

datasets.disable_progress_bars()  # the jobs show one progress bar: training's

_BUILDERS = {".txt": "text", ".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """Bad training data, caught before any training step."""


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.stat().st_size == 0 or not path.read_bytes()[:65536].strip():
        raise DataError(f"{path}: file is empty")


def text_fix_note(fix: bool) -> str:
    """What the model card records of the repair: the library and version, or that there was none."""
    return f"ftfy {ftfy.__version__} fix_text (uncurl_quotes=False) after two repairs of broken quotes" if fix else "none"


# NOTE: two repairs ftfy cannot make alone, both seen in the TinyStories text. (1) The closing quote "”"
# (UTF-8 E2 80 9D) read as Windows-1252 loses its 0x9D byte (undefined there), leaving "â€": ftfy leaves it,
# or decodes "â€ " as a dagger. A bare "â€" before an ASCII character or the end can only be that quote,
# since the third byte of E2 80 xx is never ASCII. (2) Text lowercased after it broke turns the lead
# characters "Ã"/"Â" into "ã"/"â" ("muã±eca"), which ftfy no longer recognises: upper-cased again when a
# continuation character (U+00A0..U+00BF) follows, a pair real text does not hold.
_LOST_CLOSING_QUOTE = re.compile("\u00e2\u20ac(?=[\\x00-\\x7f]|$)")
_LOWERED_LEAD = re.compile("([\u00e2\u00e3])(?=[\u00a0-\u00bf])")


def clean_text(text: str) -> str:
    """`text` with its mojibake, HTML entities and control characters repaired by ftfy. Quotes stay as
    written (German „…" included): this repairs text, it does not normalise it."""
    text = _LOST_CLOSING_QUOTE.sub("\u201d", text)
    text = _LOWERED_LEAD.sub(lambda m: m.group(1).upper(), text)
    return ftfy.fix_text(text, uncurl_quotes=False)


def fix_text(ds: Dataset, columns: Sequence[str]) -> Dataset:
    """The `columns` of `ds` that it has, repaired with ftfy.fix_text (mojibake, entities, quotes); other
    columns untouched."""
    present = [c for c in columns if c in ds.column_names]
    return ds.map(lambda ex: {c: clean_text(ex[c]) if isinstance(ex[c], str) else ex[c] for c in present})


def load_text(paths: Sequence[Path], sample_by: str = "line", fix: bool = False) -> Dataset:
    """Plain-text files as one dataset with a `text` column.

    `sample_by`: "line" (one example per line), "paragraph" (blank-line separated)
    or "document" (one example per file). Blank examples are dropped.
    Any suffix but a table's is plain text (train.en, train.de).
    """
    for p in paths:
        _check_file(Path(p))
        if _BUILDERS.get(Path(p).suffix.lower(), "text") != "text":
            raise DataError(f"{p}: expected plain text, got a {Path(p).suffix} table")
    ds = datasets.load_dataset("text", data_files=[str(p) for p in paths], sample_by=sample_by,
                               split="train", keep_linebreaks=True)
    ds = ds.filter(lambda ex: bool(ex["text"].strip()))
    if len(ds) == 0:
        raise DataError(f"{', '.join(map(str, paths))}: no text")
    return fix_text(ds, ["text"]) if fix else ds


def load_table(path: Path, columns: Sequence[str], header: bool = True, fix: Sequence[str] = ()) -> Dataset:
    """A csv/tsv/jsonl/parquet file with at least `columns` (checked, named in the error).

    A header-less csv/tsv (`header=False`) takes `columns` as its column names, in order. The text columns
    named in `fix` are repaired with ftfy.
    """
    path = Path(path)
    _check_file(path)
    builder = _BUILDERS.get(path.suffix.lower(), "text")
    if builder == "text":
        raise DataError(f"{path}: expected a table (.csv/.tsv/.jsonl/.parquet), got {path.suffix!r}")
    kwargs: dict = {}
    if builder == "csv":
        kwargs["delimiter"] = "\t" if path.suffix.lower() == ".tsv" else ","
        kwargs["quoting"] = 3  # csv.QUOTE_NONE: SST-2 style TSVs hold bare quote characters
        if not header:
            kwargs["column_names"] = list(columns)
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except ValueError as e:
        if "corresponds to no data" in str(e):  # a header and no rows
            raise DataError(f"{path}: file is empty (no rows)") from e
        raise DataError(f"{path}: cannot read as {builder}: {e}") from e
    except Exception as e:  # pyarrow/pandas parse errors: name the file, keep the cause
        raise DataError(f"{path}: cannot read as {builder}: {e}") from e
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; the file has {ds.column_names}")
    if len(ds) == 0:
        raise DataError(f"{path}: file is empty (no rows)")
    return fix_text(ds, fix) if fix else ds


def load_parallel(src_path: Path, tgt_path: Path, fix: bool = False) -> Dataset:
    """Two line-aligned text files as a dataset with `src` and `tgt` columns."""
    src_path, tgt_path = Path(src_path), Path(tgt_path)
    for p in (src_path, tgt_path):
        _check_file(p)
    src = src_path.read_text(encoding="utf-8").splitlines()
    tgt = tgt_path.read_text(encoding="utf-8").splitlines()
    if len(src) != len(tgt):
        raise DataError(f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}: not line-aligned")
    pairs = [(s, t) for s, t in zip(src, tgt, strict=True) if s.strip() and t.strip()]
    ds = Dataset.from_dict({"src": [s for s, _ in pairs], "tgt": [t for _, t in pairs]})
    return fix_text(ds, ["src", "tgt"]) if fix else ds


def split_heldout(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """(train, held-out) by a seeded shuffle; the held-out part is never trained on."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"--eval-fraction must be in (0, 1), got {fraction}")
    if len(ds) < 2:
        raise DataError(f"{len(ds)} example(s): too few to hold out an eval split; give --eval")
    parts = ds.train_test_split(test_size=fraction, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def limit(ds: Dataset, max_examples: int | None) -> Dataset:
    """The first `max_examples` rows (all rows when None)."""
    if max_examples is None or max_examples >= len(ds):
        return ds
    return ds.select(range(max_examples))
