"""`lmservice batch` against `lmservice serve` on the same requests: generated tokens per second.

The workload: --requests completions (default 1,000), each a prompt of --prompt-len random token ids
(distinct per request, so no prefix-cache hits) and --new-tokens generated (greedy, ignore_eos), not streamed.
The batch answers them from a file, --batch-concurrency lines at once (each value one run); the server
answers the same bodies over HTTP from --concurrency clients (default 32). Both load the same model with the
same settings (--serve-arg flags go to both).

Throughput is generated tokens / the time from the first request to the last answer: for the batch its own
summary (from its engine's start), for the server the client's clock. The batch's wall time with model
loading is printed beside it.

    python benchmarks/batch.py                                      # the shipped models/base, 1,000 requests
    python benchmarks/batch.py --requests 100 --new-tokens 8        # a quick look
    python benchmarks/batch.py --model ./my-gpt2 --serve-arg=--threads --serve-arg=1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.serve import serve_model  # noqa: E402

SUMMARY = re.compile(r"(?P<tokens>\d+) generated tokens \((?P<rate>[\d.]+)/s\)")


def bodies(model_dir: Path, num: int, prompt_len: int, new_tokens: int, seed: int) -> list[dict]:
    vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    rng = random.Random(seed)
    return [{"model": model_dir.name, "prompt": [rng.randrange(vocab_size) for _ in range(prompt_len)],
             "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True} for _ in range(num)]


def run_batch(model_dir: Path, requests: list[dict], concurrency: int, workdir: Path, extra: list[str]) -> dict:
    input_path, output_path = workdir / f"in-{concurrency}.jsonl", workdir / f"out-{concurrency}.jsonl"
    input_path.write_text("".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                                              "body": body}) + "\n" for i, body in enumerate(requests)))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lmservice.cli", "batch", "-i", str(input_path), "-o",
                           str(output_path), "--model", str(model_dir), "--concurrency", str(concurrency), *extra],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    summary = SUMMARY.search(proc.stdout)
    if proc.returncode != 0 or summary is None:
        raise RuntimeError(f"lmservice batch exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-3000:]}")
    statuses = {json.loads(line)["response"]["status_code"] for line in output_path.read_text().splitlines()}
    if statuses != {200}:
        raise RuntimeError(f"lmservice batch answered with statuses {statuses}; see {output_path}")
    tokens, rate = int(summary["tokens"]), float(summary["rate"])
    return {"mode": "lmservice batch", "concurrency": concurrency, "tokens": tokens, "seconds": tokens / rate,
            "throughput": rate, "wall": wall}


async def run_server(base_url: str, requests: list[dict], concurrency: int) -> dict:
    semaphore = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=3600) as client:

        async def one(body: dict) -> int:
            async with semaphore:
                response = await client.post("/v1/completions", json=body)
            response.raise_for_status()
            return response.json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(b) for b in requests)))
        seconds = time.perf_counter() - start
    return {"mode": "lmservice serve (HTTP)", "concurrency": concurrency, "tokens": tokens, "seconds": seconds,
            "throughput": tokens / seconds, "wall": None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "base", help="Model directory (both sides).")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=32, help="The server's concurrent clients.")
    parser.add_argument("--batch-concurrency", type=int, nargs="+", default=[32, 64],
                        help="The batch's --concurrency, one run each (64 is its default).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--serve-arg", action="append", default=[], help="Extra setting flag for both sides.")
    args = parser.parse_args()

    model_dir = args.model.resolve()
    requests = bodies(model_dir, args.requests, args.prompt_len, args.new_tokens, args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for concurrency in args.batch_concurrency:
            rows.append(run_batch(model_dir, requests, concurrency, Path(tmp), args.serve_arg))
            print(f"# batch at {concurrency}: {rows[-1]['throughput']:.1f} tokens/s", flush=True)
        proc, base_url = serve_model(model_dir, Path(tmp), args.serve_arg)
        try:
            rows.append(asyncio.run(run_server(base_url.removesuffix("/v1"), requests, args.concurrency)))
            print(f"# server at {args.concurrency}: {rows[-1]['throughput']:.1f} tokens/s", flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    print(f"\n{args.requests} requests: prompt {args.prompt_len} token ids, {args.new_tokens} new tokens, greedy, "
          f"not streamed; {model_dir.name}")
    print("| mode | concurrency | generated tokens | seconds | tokens/s | wall with start-up (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        wall = f"{r['wall']:.1f}" if r["wall"] is not None else "-"
        print(f"| {r['mode']} | {r['concurrency']} | {r['tokens']} | {r['seconds']:.1f} | {r['throughput']:.1f} | "
              f"{wall} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
