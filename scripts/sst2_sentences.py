"""Which SST-2 rows (GLUE SST-2 train text: lowercase, PTB-tokenised) are whole sentences.

Rule (stateable): split the text on whitespace; a row is a whole sentence when
  1. its last token is ".", "!" or "?", and
  2. its first token is neither punctuation (, ; : -- '' ' ) . ! ? -) nor a verb-initial fragment
     starter: an auxiliary or a clitic (is are was were has have had does do did will would can ca
     could should might may must wo 's 're 'm 'll 've 'd n't).
Why: GLUE SST-2 train holds every phrase of the SST parse trees. The sentence-final "." hangs off
the top of the tree, so the phrases that end in "." are the sentence itself plus its right-hand
suffixes (", it has considerable charm .", "is a charming film .", "'s crap on a leash ..."). Rule 2
drops most of those suffixes. See REPORT.md for counts (SST-2 dev: 947 of 6,735 rows).

CLI:  python scripts/sst2_sentences.py FILE.tsv [--column sentence] [--label-column label]  -> counts;
      add --write OUT.tsv to write the kept rows (header kept).
"""
from __future__ import annotations

import argparse
import sys

SENTENCE_END = frozenset((".", "!", "?"))
PUNCT_START = frozenset((",", ";", ":", "--", "''", "'", ")", ".", "!", "?", "-"))
FRAGMENT_START = frozenset(
    ["is", "are", "was", "were", "has", "have", "had", "does", "do", "did", "will", "would", "can", "ca", "could", "should", "might", "may", "must", "wo", "'s", "'re", "'m", "'ll", "'ve", "'d", "n't"])


def is_whole_sentence(text: str) -> bool:
    tokens = text.split()
    return (bool(tokens) and tokens[-1] in SENTENCE_END
            and tokens[0] not in PUNCT_START and tokens[0] not in FRAGMENT_START)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("tsv")
    ap.add_argument("--column", default="sentence")
    ap.add_argument("--label-column", default="label")
    ap.add_argument("--write", metavar="OUT")
    a = ap.parse_args(argv)
    with open(a.tsv, encoding="utf-8") as f:
        header = f.readline()
        cols = header.rstrip("\n").split("\t")
        ti, li = cols.index(a.column), (cols.index(a.label_column) if a.label_column in cols else None)
        rows = [ln for ln in f if ln.strip()]
    kept = [ln for ln in rows if is_whole_sentence(ln.rstrip("\n").split("\t")[ti])]
    print(f"{a.tsv}: {len(kept)} of {len(rows)} rows are whole sentences ({len(kept) / len(rows):.1%})")
    if li is not None:
        labels: dict[str, int] = {}
        for ln in kept:
            lab = ln.rstrip("\n").split("\t")[li]
            labels[lab] = labels.get(lab, 0) + 1
        print("labels of kept rows:", dict(sorted(labels.items())))
    if a.write:
        with open(a.write, "w", encoding="utf-8") as f:
            f.write(header)
            f.writelines(kept)
    return 0


if __name__ == "__main__":
    sys.exit(main())
