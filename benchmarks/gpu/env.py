"""The machine: versions, the device, and its two ceilings (copy bandwidth, bf16 matmul rate)."""

from __future__ import annotations

import platform
import shutil
import subprocess
from importlib import metadata

import torch

from benchmarks.gpu.common import Step
from benchmarks.kernels import bench_copy_and_matmul

PACKAGES = ["torch", "triton", "transformers", "peft", "tokenizers", "safetensors", "fastapi", "uvicorn", "pydantic",
            "pydantic-settings", "llguidance", "openai", "httpx", "prometheus-client"]


def run(step: Step) -> None:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    step.metrics["versions"] = versions
    missing = [n for n, v in versions.items() if v is None]
    step.check("every package the steps import is installed", not missing, f"missing: {missing}" if missing else "")
    if step.cuda:
        props = torch.cuda.get_device_properties(0)
        step.metrics["device"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                                  "sms": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
                                  "cuda": torch.version.cuda}
        step.check("a Hopper GPU (capability 9.0)", (props.major, props.minor) == (9, 0), props.name)
        if shutil.which("nvidia-smi"):
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem,power.draw",
                                  "--format=csv"], capture_output=True, text=True, timeout=20)
            step.metrics["nvidia_smi"] = smi.stdout.strip()
    setup = step.setup(torch.bfloat16)
    gbps, tflops = bench_copy_and_matmul(setup)
    step.metrics["copy_gbps"], step.metrics["matmul_bf16_tflops"] = round(gbps, 1), round(tflops, 1)
    step.table("the machine", ["device", "torch", "triton", "transformers", "copy GB/s (read + write)",
                               "bf16 matmul TFLOP/s"],
               [[step.metrics.get("device", {}).get("name", "CPU (dry run)"), versions["torch"], versions["triton"],
                 versions["transformers"], f"{gbps:.0f}", f"{tflops:.0f}"]])
