#!/usr/bin/env bash
# The exact commands that made the default models under models/ (base, sentiment, translate-en-de).
# Run from the repository root with the venv active:  bash scripts/make_default_models.sh [step...]
# Steps: tokenizer pretrain sentiment translate (default: all, in order). Each step resumes from its
# last checkpoint if it was killed (same command), and refuses to overwrite a finished model.
# Data: ../shared/data (see its README). Scratch files go to $WORK (default /work/runs/default-models).
set -euo pipefail

DATA=${DATA:-../shared/data}
WORK=${WORK:-/work/runs/default-models}
THREADS=${THREADS:-2}
mkdir -p "$WORK" models
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(tokenizer pretrain sentiment translate)

TRAIN="python -m service.cli train"

for step in "${STEPS[@]}"; do
case $step in
tokenizer)
  # 8k byte-level BPE on the English and German text the base model is pretrained on.
  $TRAIN tokenizer --vocab-size 8192 --model-max-length 256 --output "$WORK/tokenizer" \
    --train "$DATA/tinystories/train_first5000_lowercased.txt" "$DATA/multi30k/train.en" "$DATA/multi30k/train.de"
  ;;
pretrain)
  # The train file is lowercase, so the held-out TinyStories text is lowercased too (data README).
  tr '[:upper:]' '[:lower:]' < "$DATA/tinystories/valid.txt" > "$WORK/tinystories_valid_lower.txt"
  # 6 x 256 GPT-2 (6.9M params, context 256): ~2k tokens/s on 2 idle CPU cores in fp32 (bf16 autocast
  # measured 25x slower: this CPU has neither AMX nor AVX512-BF16). 500 steps x 8 x 256 = 1M
  # tokens, half an epoch of the corpus: what the shared machine (~400 tokens/s) allowed.
  $TRAIN pretrain --tokenizer "$WORK/tokenizer" --output models/base \
    --train "$DATA/tinystories/train_first5000_lowercased.txt" "$DATA/multi30k/train.en" "$DATA/multi30k/train.de" \
    --eval "$WORK/tinystories_valid_lower.txt" "$DATA/multi30k/val.en" "$DATA/multi30k/val.de" \
    --sample-by line --preset mini --n-layer 6 --n-positions 256 \
    --max-steps 500 --batch-size 8 --lr 1.5e-3 --warmup-steps 30 --weight-decay 0.1 \
    --eval-steps 100 --save-steps 50 --max-eval-examples 128 --threads "$THREADS" --no-progress
  ;;
esac
done
