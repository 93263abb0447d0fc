#!/usr/bin/env bash
# The exact commands that made the default models under models/ (base, sentiment, translate-en-de).
# Run from the repository root with the venv active:  bash scripts/make_default_models.sh [step...]
# Steps: tokenizer pretrain sentiment translate (default: all, in order). Each step resumes from its
# last checkpoint if it was killed (same command), and refuses to overwrite a finished model.
# Data: ../shared/data (see its README). Scratch files go to $WORK (default runs/default-models, inside the
# repository and git-ignored). Paths are given relative to the repository, so the model cards record them so.
# Every job repairs its text with ftfy as it loads it (data.text_fix in the cards).
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA:-../shared/data}
WORK=${WORK:-runs/default-models}
THREADS=${THREADS:-2}
MODELS=${MODELS:-models}  # where the three models are written: $MODELS/base, $MODELS/sentiment, ...
mkdir -p "$WORK" "$MODELS"
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(tokenizer pretrain sentiment translate)

# Plain-text corpus files made from the shared data (cheap; remade on every run).
# SST-2 train sentences (the text column only, no labels) are pretraining text too: the base must have
# read movie-review English for the sentiment head to find anything in its features. Only train rows:
# SST-2 dev scores the classifier and its test split is held back. AG News is left out: its terms are
# research / non-commercial only (data README), and these models ship.
# Capitalised prompts: the TinyStories train file and SST-2 are all lowercase (Multi30k is cased), so a base
# trained on them as they are answers "Hello" with garbage. scripts/recase.py puts sentence case back
# (sentence starts, "I", character names learned from the train file itself, days and months): 99.5% of
# words cased as in the cased TinyStories valid file, against 86% for lowercase.
SST2_TEXT="$WORK/sst2_train_sentences.txt"
tail -n +2 "$DATA/sst2/train.tsv" | cut -f1 | sed 's/[[:space:]]*$//' | python scripts/recase.py > "$SST2_TEXT"
STORIES="$WORK/tinystories_train_cased.txt"
python scripts/recase.py "$DATA/tinystories/train_first5000_lowercased.txt" > "$STORIES"
TEXT=("$STORIES" "$DATA/multi30k/train.en" "$DATA/multi30k/train.de" "$SST2_TEXT")
# Sentiment: users send whole sentences, cased; SST-2 dev is mostly short phrases. The classifier trains on
# every train phrase plus a sentence-cased copy of each, and is scored on the dev rows that are whole
# sentences (scripts/sst2_sentences.py states the rule: 947 of the 6,735 rows).
SST2_TRAIN="$WORK/sst2_train_and_cased.tsv"
{ cat "$DATA/sst2/train.tsv"; tail -n +2 "$DATA/sst2/train.tsv" | python scripts/recase.py --tsv; } > "$SST2_TRAIN"
SST2_DEV_SENTENCES="$WORK/sst2_dev_sentences.tsv"
python scripts/sst2_sentences.py "$DATA/sst2/dev.tsv" --write "$SST2_DEV_SENTENCES" >/dev/null

TRAIN="python -m lmservice.cli train"
BASE=${BASE:-$MODELS/base}  # the adapters' base: train them on the installed models/base so their cards name it

for step in "${STEPS[@]}"; do
case $step in
tokenizer)
  # 8k byte-level BPE on the English and German text the base model is pretrained on.
  $TRAIN tokenizer --vocab-size 8192 --model-max-length 256 --output "$WORK/tokenizer" --train "${TEXT[@]}"
  ;;
pretrain)
  # 6 x 256 GPT-2 (6.9M params, context 256) with bf16 autocast (1.5x faster than fp32 on a CPU with
  # AVX512-BF16; drop --bf16 elsewhere). 1200 steps x 16 x 256 = 4.9M tokens, ~1.7 epochs of the
  # ~3.0M-token corpus (TinyStories + Multi30k en/de + SST-2 train sentences): 26 min on a quiet
  # 2-core AMD EPYC (~3k tokens/s).
  # Held out: the cased TinyStories valid file (as written) and Multi30k val.
  $TRAIN pretrain --tokenizer "$WORK/tokenizer" --output "$BASE" --train "${TEXT[@]}" \
    --eval "$DATA/tinystories/valid.txt" "$DATA/multi30k/val.en" "$DATA/multi30k/val.de" \
    --sample-by line --preset mini --n-layer 6 --n-positions 256 \
    --max-steps 1200 --batch-size 16 --lr 2e-3 --warmup-steps 100 --weight-decay 0.1 \
    --eval-steps 400 --save-steps 100 --logging-steps 20 --max-eval-examples 128 --threads "$THREADS" \
    --bf16 --no-progress
  ;;
sentiment)
  # LoRA (r 32, alpha 32) on attention + MLP *and on the token embeddings (wte)*, + a trained score head;
  # SST-2 train phrases + their sentence-cased copies, scored on the whole-sentence dev rows. Labels 0/1 are
  # named negative/positive in the card. Shorter phrases batched together (less padding). 3800 x 32 = 122k
  # rows (~1 epoch), bf16: ~10 min quiet; whole-sentence dev accuracy 0.872.
  # Why wte (measured on the previous, lowercase base; dev accuracy of one-epoch runs), LoRA on c_attn c_proj c_fc only: r 16 lr 2e-3
  # 0.707, r 16 lr 5e-4 0.748, r 32 lr 1e-3 0.751 (4 epochs: 0.794), r 64 alpha 128 lr 3e-3 0.601
  # (unstable), --lora-extract r 64 0.744. Full fine-tuning 0.862; full fine-tuning of the projection
  # weights + wte only 0.868, of wte + score alone 0.857: the words' embeddings carry the task.
  # The same r 32 LoRA with wte added: 0.871 after one epoch.
  $TRAIN classify --base "$BASE" --output "$MODELS/sentiment" \
    --train "$SST2_TRAIN" --eval "$SST2_DEV_SENTENCES" --text-column sentence --label-column label \
    --labels 0 1 --label-names negative positive \
    --lora --lora-r 32 --lora-alpha 32 --lora-targets c_attn c_proj c_fc wte \
    --max-steps 3800 --batch-size 32 --lr 1e-3 --warmup-steps 100 --sampling group_by_length --max-length 128 \
    --save-steps 200 --logging-steps 50 --threads "$THREADS" --bf16 --no-progress
  ;;
translate)
  # LoRA (r 32 on attention + MLP) on Multi30k train; BLEU/chrF of greedy output on Multi30k val.
  # 8000 x 16 = 128k pairs (~4.4 epochs), label smoothing 0.1, bf16 autocast (1.5x faster than fp32 on
  # a CPU with AVX512-BF16): ~25 min on a 2-core AMD EPYC; BLEU 23.94 on Multi30k val (4500 steps: 20.6).
  $TRAIN translate --base "$BASE" --output "$MODELS/translate-en-de" \
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
