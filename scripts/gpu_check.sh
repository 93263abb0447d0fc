#!/usr/bin/env bash
# The GPU bring-up check of lmservice: kernels, engine and server measured on one CUDA GPU (an H200 here),
# in about 7 minutes, every step in its own process under its own time limit.
#
# Steps (scripts/gpu_check.py's STEPS; code in benchmarks/gpu/, one module each):
#   env           versions, the device, its copy bandwidth and bf16 matmul rate
#   kernel_tests  every Triton kernel compiled for the GPU vs its torch reference (fp32/bf16/fp16, NaN-poisoned outputs)
#   parity        engine greedy tokens == transformers' in fp32 (CUDA graphs on/off, prefix cache, chunked
#                 prefill, block size 32); bf16 agreement rate and logprob distance
#   kernel_bench  prefill TFLOP/s vs SDPA (flash), seq 512-4096, batch 1-64; paged decode GB/s vs the copy
#                 bandwidth, batch 1-256, context 128-2048, block sizes 16/32
#   decode_step   GPT-2 small decode step at batch 1/32/256 (graph replay, engine step) vs its byte floor
#   serve         `lmservice serve` (HTTP, streamed) vs transformers generate in static batches, c = 1/32/256
#   lora          multi-LoRA vs PEFT (fp32 parity); 8 adapters vs base only (bf16 throughput)
#   structured    JSON-schema rows beside free rows on the GPU; parity with the CPU engine; mask overhead
#   int8          --quantization int8 on CUDA, or the message that refuses it
#
# Usage:
#   bash scripts/gpu_wheels.sh                   # once, here (network): the wheels the GPU machine lacks -> wheels/
#   bash scripts/gpu_check.sh                    # on the GPU machine; writes to $OUT, else ./gpu_check_out
#   bash scripts/gpu_check.sh --steps env,parity # some steps only
#   bash scripts/gpu_check.sh --dry-run          # on a CPU: every step at tiny shapes (Triton interpreter), ~1-2 min
#
# From a session with the device tool (the repository travels; wheels/ is git-ignored, so it is carried):
#   run(command="bash scripts/gpu_check.sh", carry=["wheels"], timeout_s=540)
# What comes back under $OUT: summary.json (every step's status, checks and figures), report.md (every table,
# for docs/benchmarks.md), steps.tar.gz (each step's log and JSON; the server's log) and gpu_check.log.
#
# Nothing is installed but the wheels in wheels/ whose distributions are missing (pip --no-index --no-deps);
# the code runs from the checkout (PYTHONPATH). The exit status is 0 only when every step is ok.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-$PWD/gpu_check_out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

dry=0
for arg in "$@"; do [ "$arg" = --dry-run ] && dry=1; done
if [ "$dry" = 0 ] && [ -d wheels ]; then
    mapfile -t missing < <("$PY" scripts/gpu_check.py --missing-wheels wheels | grep .)
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "installing ${#missing[@]} missing wheels: ${missing[*]##*/}"
        pip_install=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir)
        if ! "${pip_install[@]}" "${missing[@]}"; then
            # NOTE: a read-only interpreter: the wheels go on PYTHONPATH instead, which benchmarks/serve.py's
            # server launch replaces with the checkout alone (the serve step then fails to import fastapi)
            echo "pip could not install into $PY's environment; using /tmp/gpu_check_site on PYTHONPATH"
            "${pip_install[@]}" --target /tmp/gpu_check_site "${missing[@]}" && export PYTHONPATH="$PYTHONPATH:/tmp/gpu_check_site"
        fi
    fi
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm --format=csv

args=(--out "$OUT_DIR")
[ -n "${OUT:-}" ] && args+=(--bundle)  # the device machine sends back at most 8 files
"$PY" scripts/gpu_check.py "${args[@]}" "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
