"""Multi-LoRA on the device: parity with transformers + PEFT, and the cost of 8 adapters in one batch.

Parity (fp32, greedy): tests/engine/test_multi_lora.py's three PEFT adapters (attention, all projections
with the token embeddings, MLP + position embeddings with rsLoRA) and the base model, mixed in one batch,
against PeftModel's generate on the same device. Throughput (bf16): benchmarks/multi_lora.py's workload,
requests spread over 8 rank-8 adapters against the same requests on the base model alone.
"""

from __future__ import annotations

import torch

from benchmarks.gpu.common import Step, greedy_tokens, hf_greedy


def check_parity(step: Step) -> None:
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    from lmservice.engine.engine import Engine, EngineConfig
    from lmservice.model.loader import load_model
    from tests.engine.test_multi_lora import ADAPTERS, make_adapter
    from tests.helpers import prompts

    base = step.model_dir("gpt2", seed=4)
    dirs = {name: make_adapter(base, step.workdir / "peft" / name, *spec, seed=i)
            for i, (name, spec) in enumerate(ADAPTERS.items())}
    names = [None, *dirs]
    ps = prompts(8, step.shape()["vocab_size"], 3, 40, seed=8)
    adapters = [names[i % len(names)] for i in range(len(ps))]
    new_tokens = 4 if step.dry else 8
    want: dict[int, list[int]] = {}
    for name in names:
        model = GPT2LMHeadModel.from_pretrained(base)
        if name is not None:
            model = PeftModel.from_pretrained(model, dirs[name])
        model = model.to(step.device).eval()
        rows = [i for i, a in enumerate(adapters) if a == name]
        toks, _ = hf_greedy(model, [ps[i] for i in rows], new_tokens, step.device)
        want.update(zip(rows, toks, strict=True))
        del model
    engine = Engine(load_model(base, step.device.type, "float32"), EngineConfig.from_fields(
        num_kv_blocks=512, max_loras=8, attention_backend="triton" if step.cuda else "torch"))
    for name, path in dirs.items():
        engine.add_adapter(name, path)
    got, _ = greedy_tokens(engine, ps, new_tokens, adapters=adapters)
    same = [got[i] == want[i] for i in range(len(ps))]
    table = []
    for name in names:
        rows = [i for i, a in enumerate(adapters) if a == name]
        equal = f"{sum(same[i] for i in rows)}/{len(rows)}"
        step.check(f"fp32 adapter {name or 'none (base)'}: greedy tokens equal PEFT's", all(same[i] for i in rows),
                   f"{equal} prompts")
        table.append([name or "none (base)", equal])
    step.table(f"multi-LoRA vs transformers + PEFT, fp32, greedy, {new_tokens} new tokens, {step.device.type}, "
               "all adapters in one batch", ["adapter", "prompts with equal tokens"], table)
    step.check("every KV block free when idle", engine.pool.num_used_blocks == 0)


def bench_throughput(step: Step) -> None:
    from benchmarks.multi_lora import run as run_requests
    from benchmarks.multi_lora import write_adapter
    from lmservice.engine.engine import Engine, EngineConfig
    from lmservice.model.loader import load_model

    shape = step.shape("gpt2")
    num_adapters = 2 if step.dry else 8
    concurrency, prompt_len, new_tokens = (4, 8, 8) if step.dry else (64, 32, 64)
    base = step.model_dir("gpt2")
    engine = Engine(load_model(base, step.device.type, "bfloat16"), EngineConfig.from_fields(
        kv_cache_memory_mb=1024 if step.cuda else 64, max_num_seqs=256, max_loras=num_adapters,
        enable_prefix_caching=False, attention_backend="triton" if step.cuda else "torch"))
    for i in range(num_adapters):
        write_adapter(step.workdir / f"bench-a{i}", shape, 8, seed=i)
        engine.add_adapter(f"a{i}", step.workdir / f"bench-a{i}")
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, shape["vocab_size"] - 1, (concurrency, prompt_len), generator=g).tolist()
    run_requests(engine, [(p, f"a{i % num_adapters}") for i, p in enumerate(prompts)], 4)  # warm-up: compile, tune
    rows, rates = [], {}
    for k in (0, num_adapters):
        names = [None] * concurrency if k == 0 else [f"a{i % k}" for i in range(concurrency)]
        n, t = run_requests(engine, list(zip(prompts, names, strict=True)), new_tokens)
        step.check(f"{k} adapters: every token generated", n == concurrency * new_tokens, f"{n}")
        rates[k] = n / t
        rows.append([k, f"{rates[k]:.0f}", f"{rates[k] / rates[0]:.2f}x"])
    step.metrics["tok_s"] = rates
    step.table(f"multi-LoRA, bf16, {step.device.type}: {concurrency} requests, prompt {prompt_len}, {new_tokens} new "
               "tokens, rank-8 adapters on all four projections", ["distinct adapters", "tok/s", "vs base only"], rows)


def run(step: Step) -> None:
    step.run_part(check_parity)
    step.run_part(bench_throughput)
