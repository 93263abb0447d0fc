"""Accuracy of a classification adapter (PEFT LoRA + score head) on a labelled TSV, through transformers + PEFT.

    python scripts/eval_classifier.py models/sentiment --tsv ../shared/data/sst2/dev.tsv            # all rows
    python scripts/eval_classifier.py models/sentiment --tsv runs/default-models/sst2_dev_sentences.tsv \\
        --recase                        # the same rows sentence-cased (scripts/recase.py), as users write

Labels are the TSV's label column, read in the adapter card's label order (its data.label_values).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoTokenizer, GPT2ForSequenceClassification

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recase import sentence_case  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("adapter", type=Path)
    ap.add_argument("--base", type=Path, default=None, help="default: the card's base_model")
    ap.add_argument("--tsv", type=Path, required=True)
    ap.add_argument("--text-column", default="sentence")
    ap.add_argument("--label-column", default="label")
    ap.add_argument("--recase", action="store_true", help="sentence-case each text first")
    args = ap.parse_args()
    card = json.loads((args.adapter / "lmservice.json").read_text())
    values = card["data"]["label_values"]
    base = args.base or Path(card["base_model"])
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = GPT2ForSequenceClassification.from_pretrained(str(base), num_labels=len(values), dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    model = PeftModel.from_pretrained(model, str(args.adapter)).eval()
    with args.tsv.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    texts = [sentence_case(r[args.text_column]) if args.recase else r[args.text_column] for r in rows]
    labels = [values.index(r[args.label_column].strip()) for r in rows]
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(texts), 64):
            enc = tokenizer(texts[i:i + 64], return_tensors="pt", padding=True)
            pred = model(**enc).logits.argmax(-1).tolist()
            correct += sum(p == y for p, y in zip(pred, labels[i:i + 64], strict=True))
    print(json.dumps({"adapter": str(args.adapter), "tsv": str(args.tsv), "recase": args.recase,
                      "rows": len(rows), "accuracy": round(correct / len(rows), 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
