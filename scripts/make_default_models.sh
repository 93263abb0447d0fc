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

# Plain-text corpus files made from the shared data (cheap; remade on every run).
# SST-2 train sentences (the text column only, no labels) are pretraining text too: the base must have
# read movie-review English for the sentiment head to find anything in its features. Only train rows:
# SST-2 dev scores the classifier and its test split is held back. AG News is left out: its terms are
# research / non-commercial only (data README), and these models ship.
SST2_TEXT="$WORK/sst2_train_sentences.txt"
tail -n +2 "$DATA/sst2/train.tsv" | cut -f1 | sed 's/[[:space:]]*$//' > "$SST2_TEXT"
TEXT=("$DATA/tinystories/train_first5000_lowercased.txt" "$DATA/multi30k/train.en" "$DATA/multi30k/train.de" "$SST2_TEXT")

TRAIN="python -m lmservice.cli train"

for step in "${STEPS[@]}"; do
case $step in
tokenizer)
  # 8k byte-level BPE on the English and German text the base model is pretrained on.
  $TRAIN tokenizer --vocab-size 8192 --model-max-length 256 --output "$WORK/tokenizer" --train "${TEXT[@]}"
  ;;
pretrain)
  # The train file is lowercase, so the held-out TinyStories text is lowercased too (data README).
  tr '[:upper:]' '[:lower:]' < "$DATA/tinystories/valid.txt" > "$WORK/tinystories_valid_lower.txt"
  # 6 x 256 GPT-2 (6.9M params, context 256) with bf16 autocast (1.5x faster than fp32 on a CPU with
  # AVX512-BF16; drop --bf16 elsewhere). 1600 steps x 16 x 256 = 6.6M tokens, ~2.2 epochs of the
  # ~3.0M-token corpus (TinyStories + Multi30k en/de + SST-2 train sentences): 35 min on a quiet
  # 2-core AMD EPYC (~3k tokens/s).
  $TRAIN pretrain --tokenizer "$WORK/tokenizer" --output models/base --train "${TEXT[@]}" \
    --eval "$WORK/tinystories_valid_lower.txt" "$DATA/multi30k/val.en" "$DATA/multi30k/val.de" \
    --sample-by line --preset mini --n-layer 6 --n-positions 256 \
    --max-steps 1600 --batch-size 16 --lr 2e-3 --warmup-steps 100 --weight-decay 0.1 \
    --eval-steps 400 --save-steps 100 --logging-steps 20 --max-eval-examples 128 --threads "$THREADS" \
    --bf16 --no-progress
  ;;
sentiment)
  # LoRA (r 32, alpha 32) on attention + MLP *and on the token embeddings (wte)*, + a trained score head;
  # SST-2 train, scored on SST-2 dev. Labels 0/1 are named negative/positive in the card. Shorter phrases
  # batched together (less padding). 3800 x 32 = 122k phrases (~2 epochs), bf16: 10 min, dev accuracy 0.881.
  # Why wte: one-epoch runs on this base (dev accuracy), LoRA on c_attn c_proj c_fc only: r 16 lr 2e-3
  # 0.707, r 16 lr 5e-4 0.748, r 32 lr 1e-3 0.751 (4 epochs: 0.794), r 64 alpha 128 lr 3e-3 0.601
  # (unstable), --lora-extract r 64 0.744. Full fine-tuning 0.862; full fine-tuning of the projection
  # weights + wte only 0.868, of wte + score alone 0.857: the words' embeddings carry the task.
  # The same r 32 LoRA with wte added: 0.871 after one epoch.
  $TRAIN classify --base models/base --output "$MODELS/sentiment" \
    --train "$DATA/sst2/train.tsv" --eval "$DATA/sst2/dev.tsv" --text-column sentence --label-column label \
    --labels 0 1 --label-names negative positive \
    --lora --lora-r 32 --lora-alpha 32 --lora-targets c_attn c_proj c_fc wte \
    --max-steps 3800 --batch-size 32 --lr 1e-3 --warmup-steps 100 --sampling group_by_length --max-length 128 \
    --save-steps 200 --logging-steps 50 --threads "$THREADS" --bf16 --no-progress
  ;;
translate)
  # LoRA (r 32 on attention + MLP) on Multi30k train; BLEU/chrF of greedy output on Multi30k val.
  # 8000 x 16 = 128k pairs (~4.4 epochs), label smoothing 0.1, bf16 autocast (1.5x faster than fp32 on
  # a CPU with AVX512-BF16): ~37 min on a quiet 2-core AMD EPYC.
  $TRAIN translate --base models/base --output "$MODELS/translate-en-de" \
    --train-src "$DATA/multi30k/train.en" --train-tgt "$DATA/multi30k/train.de" \
    --eval-src "$DATA/multi30k/val.en" --eval-tgt "$DATA/multi30k/val.de" --source-lang en --target-lang de \
    --lora --lora-r 32 --lora-alpha 64 --lora-targets c_attn c_proj c_fc \
    --max-steps 8000 --batch-size 16 --lr 2e-3 --warmup-steps 100 --label-smoothing 0.1 \
    --sampling group_by_length --max-new-tokens 64 --save-steps 250 --logging-steps 50 --threads "$THREADS" \
    --bf16 --no-progress
  ;;
*) echo "unknown step: $step" >&2; exit 2 ;;
esac
done
