"""`--quantization int8` on the device: it runs (greedy agreement with fp32 on models/base is reported), or
loading refuses it with a message that says where it runs; either way the report states which."""

from __future__ import annotations

from pathlib import Path

from benchmarks.gpu.common import Step, agreement, greedy_tokens
from benchmarks.gpu.parity import STORIES

MODEL = Path(__file__).resolve().parents[2] / "models" / "base"


def run(step: Step) -> None:
    from lmservice.engine.engine import Engine, EngineConfig
    from lmservice.model.config import ModelConfigError
    from lmservice.model.loader import load_model

    device = step.device.type
    try:
        quantized = load_model(MODEL, device, "float32", quantization="int8")
    except ModelConfigError as e:
        step.metrics["int8"] = f"refused on {device}: {e}"
        step.check(f"int8 on {device}: refused at load with a message naming the CPU", "CPU" in str(e), str(e))
        step.note(f"--quantization int8 does not run on {device}: {e}")
        return
    fp32 = load_model(MODEL, device, "float32")
    config = EngineConfig.from_fields(num_kv_blocks=256, enable_prefix_caching=False)
    ps = [fp32.tokenizer.encode(s) for s in STORIES]
    new_tokens = 8 if step.dry else 32
    want, _ = greedy_tokens(Engine(fp32, config), ps, new_tokens)
    got, _ = greedy_tokens(Engine(quantized, config), ps, new_tokens)
    same, prefix = agreement(got, want)
    step.metrics["int8"] = {"same_sequences": same, "prompts": len(ps), "token_agreement": prefix}
    step.check(f"int8 on {device}: runs and agrees with fp32 on most prompts", 2 * same >= len(ps), f"{same}/{len(ps)}")
    step.table(f"--quantization int8 vs fp32 on {device}, models/base, greedy, {new_tokens} new tokens",
               ["sequences identical", "tokens before the first divergence"], [[f"{same}/{len(ps)}", f"{prefix:.0%}"]])
