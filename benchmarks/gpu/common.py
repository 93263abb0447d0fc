"""What every GPU-check step shares: the Step record it fills, checks, tables and model directories."""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.common import SHAPES
from benchmarks.kernels import Setup

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# norm-relative error allowed per storage dtype (bf16 rounds each element by up to 2^-8 of its size)
REL_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@dataclass
class Step:
    """One step's run: where it runs, and what it found. A step passes when every check passed."""

    name: str
    device: torch.device
    dry: bool
    workdir: Path  # scratch: model directories, server logs (deleted with the process's temp dir)
    logdir: Path  # kept: files a step leaves for the report (server logs)
    checks: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    tables: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def shape(self, name: str = "gpt2") -> dict:
        """A model shape: the named one on a GPU, the tiny one in a dry run."""
        return dict(SHAPES["tiny" if self.dry else name])

    def setup(self, dtype: torch.dtype = torch.bfloat16) -> Setup:
        """benchmarks/kernels.py's timer: CUDA events on a GPU, few repetitions in a dry run."""
        return Setup(self.device, dtype, self.dry, warmup=1 if self.dry else 10, reps=2 if self.dry else 50)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append({"name": name, "ok": bool(ok), "detail": detail})
        print(f"[{'ok' if ok else 'FAILED'}] {name} {detail}", flush=True)
        return bool(ok)

    def check_close(self, name: str, out: torch.Tensor, ref: torch.Tensor, tol: float) -> bool:
        """Norm-relative error of out against ref (ref in higher precision); NaN anywhere fails."""
        rel = rel_err(out, ref)
        return self.check(name, rel <= tol, f"rel err {rel:.2e} (tol {tol:.0e})")

    def run_check(self, name: str, fn) -> bool:
        """fn() raises AssertionError (torch.testing.assert_close, assert) on a mismatch."""
        try:
            fn()
        except AssertionError as e:
            return self.check(name, False, " ".join(str(e).split())[:400])
        return self.check(name, True)

    def run_part(self, part, *args) -> None:
        """One independent part of a step: an exception fails it alone (its traceback goes to the log)."""
        try:
            part(self, *args)
        except Exception as e:  # the other parts' checks and tables still count
            traceback.print_exc()
            self.check(f"{part.__name__} raised", False, f"{type(e).__name__}: {str(e)[:400]}")

    def table(self, title: str, header: list[str], rows: list[list]) -> None:
        lines = [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        self.tables.append("\n".join(lines))
        print("\n".join(lines) + "\n", flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"note: {text}", flush=True)

    def model_dir(self, name: str = "gpt2", seed: int = 0, **overrides) -> Path:
        """A random-weight GPT-2 checkpoint with a byte-level tokenizer (tests/helpers.py), made once per step."""
        from tests.helpers import make_gpt2_dir

        path = self.workdir / f"{name}-{seed}"
        if not path.exists():
            make_gpt2_dir(path, seed=seed, **{**self.shape(name), **overrides})
        return path

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def result(self, seconds: float, error: str | None) -> dict:
        failed = [c["name"] for c in self.checks if not c["ok"]]
        status = "error" if error else ("failed" if failed else "ok")
        return {"step": self.name, "status": status, "seconds": round(seconds, 1), "dry_run": self.dry,
                "device": torch.cuda.get_device_name() if self.cuda else "cpu", "failed_checks": failed,
                "checks": self.checks, "metrics": self.metrics, "tables": self.tables, "notes": self.notes,
                "error": error}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def run_step(name: str, module, dry: bool, workdir: Path, logdir: Path) -> dict:
    """Run module.run(step) and return the step's JSON record; an exception is the step's error."""
    device = torch.device("cpu" if dry else "cuda")
    step = Step(name, device, dry, workdir, logdir)
    torch.manual_seed(0)
    start, error = time.perf_counter(), None
    try:
        module.run(step)
    except Exception:  # the record names it; the other steps run on
        error = traceback.format_exc()
        print(error, flush=True)
    return step.result(time.perf_counter() - start, error)


def write_json(path: Path, record: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.replace(path)


def greedy_tokens(engine, prompts: list[list[int]], new_tokens: int, stagger: int = 0, logprobs: int | None = None,
                  adapters: list[str | None] | None = None) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy tokens (and the chosen tokens' logprobs) of each prompt through the engine, `stagger` requests
    joining per step after the first batch (tests/helpers.py's run_to_completion)."""
    from lmservice.engine.sampling_params import SamplingParams
    from tests.helpers import run_to_completion

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, logprobs=logprobs)
    adapters = adapters or [None] * len(prompts)
    requests = [(f"r{i}", p, params, a) for i, (p, a) in enumerate(zip(prompts, adapters, strict=True))]
    results = run_to_completion(engine, requests, stagger=stagger)
    tokens = [results[f"r{i}"]["tokens"][0] for i in range(len(prompts))]
    lps = [[lp.logprob for lp in results[f"r{i}"]["logprobs"].get(0, [])] for i in range(len(prompts))]
    return tokens, lps


def hf_greedy(model, prompts: list[list[int]], new_tokens: int, device) -> tuple[list[list[int]], list[list[float]]]:
    """transformers' generate, one prompt at a time (no padding): tokens and each chosen token's log-softmax."""
    tokens, logprobs = [], []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p], device=device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=0)
            toks = out.sequences[0, len(p):].tolist()
            tokens.append(toks)
            logprobs.append([torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.logits, toks, strict=True)])
    return tokens, logprobs


def first_divergence(a: list[int], b: list[int]) -> int:
    """Index of the first differing token (len when one is a prefix of the other)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def agreement(got: list[list[int]], want: list[list[int]]) -> tuple[int, float]:
    """(sequences identical, fraction of tokens before each sequence's first divergence)."""
    same = sum(g == w for g, w in zip(got, want, strict=True))
    prefix = sum(first_divergence(g, w) for g, w in zip(got, want, strict=True))
    return same, prefix / max(1, sum(len(w) for w in want))


def cuda_graphs_of(engine):
    """The runner's CUDA-graph decode path (lmservice/engine/cuda_graphs.py), or None (a CPU, graphs off)."""
    runner = engine.runner
    path = getattr(runner, "fast_path", None) or getattr(runner, "decode_graphs", None)
    return path if type(path).__name__ == "DecodeGraphs" else None


def now_utc() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
