"""HTTP serving benchmark: a fixed streaming workload against any OpenAI-compatible server.

Each request: a prompt of --prompt-len random token ids (distinct per request, so no
prefix-cache hits), --new-tokens generated (ignore_eos), greedy, streamed over
/v1/completions. For each concurrency level, --requests-per-level (default 2 x the
level) requests run with at most that many in flight. Printed per level: output
throughput (generated tokens / wall time), time to first token p50/p99 and
inter-token latency p50/p99 (gaps between streamed chunks carrying tokens).

    # against a running server (lmservice, llama-server, vLLM, ...)
    python benchmarks/serve.py --base-url http://127.0.0.1:8000/v1 --model base
    # start lmservice on a fresh GPT-2-small-shaped random-weight model, then measure it
    python benchmarks/serve.py --launch
    # quick check of the script itself
    python benchmarks/serve.py --launch --shape tiny --concurrency 1 4 --new-tokens 16

Token ids are sent as the prompt (OpenAI's list-of-ints form), so the workload is the
same whatever tokenizer the server has; pick --vocab-size below the server's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class RequestTiming:
    ttft_s: float
    itl_s: list[float] = field(default_factory=list)
    num_tokens: int = 0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


FORCE_TOKEN: int | None = None  # --force-token


async def one_request(client: openai.AsyncOpenAI, model: str, prompt: list[int], new_tokens: int) -> RequestTiming:
    start = time.perf_counter()
    extra = {"ignore_eos": True}
    if FORCE_TOKEN is not None:
        extra["logit_bias"] = {str(FORCE_TOKEN): 100}
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=new_tokens, temperature=0.0, stream=True,
        stream_options={"include_usage": True}, extra_body=extra)
    timing: RequestTiming | None = None
    last = start
    token_chunks, usage_tokens = 0, None
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            usage_tokens = chunk.usage.completion_tokens
        # A chunk carries tokens unless it is only the closing finish_reason (or usage); its text may be
        # empty when a token ends inside a multi-byte character.
        if not chunk.choices or (not chunk.choices[0].text and chunk.choices[0].finish_reason is not None):
            continue
        token_chunks += 1
        if timing is None:
            timing = RequestTiming(ttft_s=now - start)
        else:
            timing.itl_s.append(now - last)
        last = now
    if timing is None:
        raise RuntimeError("the server streamed no tokens")
    # Servers that report usage give exact counts; otherwise one chunk is taken as one token.
    timing.num_tokens = usage_tokens if usage_tokens is not None else token_chunks
    return timing


async def run_level(base_url: str, api_key: str, model: str, concurrency: int, num_requests: int,
                    prompt_len: int, new_tokens: int, vocab_size: int, seed: int) -> dict:
    rng = random.Random(seed * 1000 + concurrency)
    prompts = [[rng.randrange(vocab_size) for _ in range(prompt_len)] for _ in range(num_requests)]
    # No keep-alive: some servers (llama-server) close idle connections under a reusing client; a fresh local
    # connection per request costs well under a millisecond and is the same for every server.
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=0)
    async with openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=3600,
                                  http_client=httpx.AsyncClient(limits=limits, timeout=3600)) as client:
        await one_request(client, model, prompts[0][:8], 4)  # warm-up: connections, first-call costs
        semaphore = asyncio.Semaphore(concurrency)

        async def bounded(prompt: list[int]) -> RequestTiming:
            async with semaphore:
                return await one_request(client, model, prompt, new_tokens)

        start = time.perf_counter()
        timings = await asyncio.gather(*(bounded(p) for p in prompts))
        elapsed = time.perf_counter() - start
    ttft = [t.ttft_s for t in timings]
    itl = [gap for t in timings for gap in t.itl_s]
    generated = sum(t.num_tokens for t in timings)
    return {"concurrency": concurrency, "requests": num_requests, "tokens": generated, "seconds": elapsed,
            "throughput": generated / elapsed, "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
            "itl_p50": percentile(itl, 50), "itl_p99": percentile(itl, 99),
            "itl_mean": statistics.fmean(itl) if itl else float("nan")}


def launch_lmservice(shape: str, workdir: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    """Start `lmservice serve` on a fresh random-weight model; returns (process, base_url)."""
    sys.path.insert(0, str(ROOT))
    from tests.helpers import make_gpt2_dir

    shapes = {"gpt2": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
              "tiny": dict(vocab_size=1000, n_positions=512, n_embd=64, n_layer=2, n_head=4)}
    model_dir = make_gpt2_dir(workdir / "model", seed=0, **shapes[shape])
    return serve_model(model_dir, workdir, ["--served-model-name", "base", *extra])


def serve_model(model_dir: Path, workdir: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    """Start `lmservice serve --model model_dir` on a free port (its log in workdir/server.log) and wait until
    it is ready; returns (process, base_url)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(workdir / "server.log", "wb")  # noqa: SIM115 (lives as long as the server)
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmservice.cli", "serve", "--model", str(model_dir), "--port", str(port), *extra],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"lmservice exited with {proc.returncode}; see {workdir / 'server.log'}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url + "/v1"
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("lmservice did not become ready")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="OpenAI-compatible base URL (…/v1).")
    parser.add_argument("--model", default="base", help="Model name to send.")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "none"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-level", type=int, default=None, help="Default: 2 x concurrency (min 4).")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=50000, help="Prompt ids are drawn below this.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force-token", type=int, default=None,
                        help="logit_bias +100 on this token id: random weights then emit decodable text (servers "
                             "that hold back incomplete UTF-8, like llama-server, stream nothing otherwise).")
    parser.add_argument("--label", default=None, help="Name of the server in the printed table.")
    parser.add_argument("--launch", action="store_true", help="Start lmservice on a random-weight model first.")
    parser.add_argument("--shape", choices=["gpt2", "tiny"], default="gpt2", help="Model shape with --launch.")
    parser.add_argument("--serve-arg", action="append", default=[], help="Extra `lmservice serve` flag (--launch).")
    args = parser.parse_args()
    global FORCE_TOKEN
    FORCE_TOKEN = args.force_token

    proc = None
    base_url, label = args.base_url, args.label
    with tempfile.TemporaryDirectory() as tmp:
        if args.launch:
            if args.shape == "tiny":
                args.vocab_size = min(args.vocab_size, 999)
            proc, base_url = launch_lmservice(args.shape, Path(tmp), args.serve_arg)
            label = label or "lmservice"
        label = label or base_url
        try:
            rows = []
            for c in args.concurrency:
                num = args.requests_per_level or max(4, 2 * c)
                row = asyncio.run(run_level(base_url, args.api_key, args.model, c, num, args.prompt_len,
                                            args.new_tokens, args.vocab_size, args.seed))
                rows.append(row)
                print(f"# concurrency {c}: {row['requests']} requests, {row['tokens']} tokens in "
                      f"{row['seconds']:.1f}s", flush=True)
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
    print(f"\nprompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, streamed")
    print("| server | concurrency | throughput (tok/s) | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) | ITL p99 (ms) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {label} | {r['concurrency']} | {r['throughput']:.1f} | {r['ttft_p50'] * 1000:.0f} | "
              f"{r['ttft_p99'] * 1000:.0f} | {r['itl_p50'] * 1000:.1f} | {r['itl_p99'] * 1000:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
