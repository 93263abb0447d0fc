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
MODELS=${MODELS:-models}  # where the two adapters are written (their base is always models/base)
mkdir -p "$WORK" models "$MODELS"
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
sentiment)
  # LoRA (r 16 on attention + MLP) + a trained score head; SST-2 train, scored on SST-2 dev.
  # Labels 0/1 are named negative/positive in the card. Shorter phrases batched together (less padding).
  # 2000 x 32 = 64k phrases (~1 epoch). Earlier runs: lr 3e-3 x 450 steps learned nothing beyond the
  # class prior (dev acc 0.555); lr 1e-3 x 1200 steps reached 0.644.
  $TRAIN classify --base models/base --output "$MODELS/sentiment" \
    --train "$DATA/sst2/train.tsv" --eval "$DATA/sst2/dev.tsv" --text-column sentence --label-column label \
    --labels 0 1 --label-names negative positive \
    --lora --lora-r 16 --lora-alpha 32 --lora-targets c_attn c_proj c_fc \
    --max-steps 2000 --batch-size 32 --lr 1e-3 --warmup-steps 50 --sampling group_by_length --max-length 128 \
    --save-steps 100 --threads "$THREADS" --no-progress
  ;;
translate)
  # LoRA (r 32 on attention + MLP) on Multi30k train; BLEU/chrF of greedy output on Multi30k val.
  # 6000 x 16 = 96k pairs (~3.3 epochs) with bf16 autocast: 27 min on a quiet 2-core AMD EPYC with
  # AVX512-BF16 (~2.3-3.1k tokens/s; bf16 trains 1.5x faster than fp32 there). BLEU 15.21; the earlier
  # 1200-step fp32 run (0.66 epoch, on a shared machine) reached 8.85.
  $TRAIN translate --base models/base --output "$MODELS/translate-en-de" \
    --train-src "$DATA/multi30k/train.en" --train-tgt "$DATA/multi30k/train.de" \
    --eval-src "$DATA/multi30k/val.en" --eval-tgt "$DATA/multi30k/val.de" --source-lang en --target-lang de \
    --lora --lora-r 32 --lora-alpha 64 --lora-targets c_attn c_proj c_fc \
    --max-steps 6000 --batch-size 16 --lr 2e-3 --warmup-steps 30 --sampling group_by_length \
    --max-new-tokens 64 --save-steps 250 --logging-steps 50 --threads "$THREADS" --bf16 --no-progress
  ;;
*) echo "unknown step: $step" >&2; exit 2 ;;
esac
done
