"""The CPU-kernel policy: whether the native C kernels run, and for how many rows each one takes a call.

Decided once at start-up (`choose_cpu_kernels`, from `--cpu-kernels auto|native|torch`), logged once by
the engine, and handed to everything that could call C: the linear layers (lmservice/model/cpu_linear.py,
lmservice/model/quantize.py), the decode attention (ops.py's native set) and the whole-step decode
(lmservice/engine/native_decode.py). Nothing else looks the library up, so `TORCH_CPU_KERNELS` means that
no C code runs.

The row thresholds, each measured on GPT-2 small's decode steps (docs/kernels.md):
- fp32 linears of at most `linear_f32_rows` rows go to the C linear, more to oneDNN (the C linear streams
  each weight row once for all rows). On AVX-512 it was the faster up to 16 rows (Zen 4, the AMX Xeon), but the
  two round differently, and a prompt's rows alone and in a batch must give the same values (an fp32 embedding
  is the same vector alone or batched): kept at 4, where prompts rarely land;
- int8 linears of at most `linear_int8_rows` rows go to the C int8 kernel (per-row activation scales),
  more to FBGEMM; 0 where the library has no int8 kernel;
- linears with block-quantized weights (`--quantization int4`) take the C kernel for any number of rows where
  the library has an int8 kernel (`linear_block_rows`), else the dequantized torch path;
- pure decode steps of at most `decode_step_rows` sequences run as one C call, and of a per-channel int8 model
  at most `decode_step_int8_rows` (0: never);
- a bfloat16 model (`--dtype auto` on CPUs with AMX) runs C only in its decode steps of at most
  `decode_step_rows` sequences and its LM head of at most `linear_bf16_rows` rows, both with the bf16 weights
  widened to fp32 as they are read (half the bytes of fp32 weights, fp32 arithmetic); its op-by-op decodes take
  the C decode attention (bf16 queries widened); its projections otherwise go to oneDNN's bf16 kernels (AMX tiles),
  which win from a few rows on.
On AVX-512 VNNI the C int8 kernel beats FBGEMM up to 32 rows. On AVX2 it computes the same sums with more
instructions per product than FBGEMM (which sums in int16 and lets them saturate), so it loses to FBGEMM once a
call has a few rows; there it runs only in decode steps of a few rows, where one C call saves the per-op
Python and dispatch that cost more than the kernel's extra arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmservice.kernels.cpu_native import NativeLibrary, native_library
from lmservice.kernels.cpuinfo import isa_cap

CPU_KERNEL_MODES = ("auto", "native", "torch")
FEW_ROWS_F32 = 4
FEW_ROWS_INT8 = {"vnni": 32, "avx2": 0}  # by NativeLibrary.int8_kernel
DECODE_STEP_ROWS = 32
DECODE_STEP_INT8_ROWS = {"vnni": 32, "avx2": 4}
DECODE_STEP_BF16_ROWS = 8
FEW_ROWS_BF16 = 4
ANY_ROWS = 1 << 40


@dataclass(frozen=True)
class CpuKernels:
    """Which C kernels run and up to how many rows. `library` None: none at all (every threshold 0)."""

    library: NativeLibrary | None
    linear_f32_rows: int = 0
    linear_int8_rows: int = 0
    decode_step_rows: int = 0
    decode_step_int8_rows: int = 0
    linear_block_rows: int = 0
    linear_bf16_rows: int = 0

    @classmethod
    def using(cls, library: NativeLibrary, dtype: torch.dtype = torch.float32) -> CpuKernels:
        """The policy for a model in `dtype` (float32 or bfloat16) on `library`."""
        if dtype == torch.bfloat16:
            return cls(library, decode_step_rows=DECODE_STEP_BF16_ROWS, linear_bf16_rows=FEW_ROWS_BF16)
        int8 = library.int8_kernel
        return cls(library, FEW_ROWS_F32, FEW_ROWS_INT8.get(int8, 0), DECODE_STEP_ROWS,
                   DECODE_STEP_INT8_ROWS.get(int8, 0), ANY_ROWS if int8 else 0)

    def describe(self) -> dict[str, str | int | None]:
        """What is in use, for the start-up log, /health and a metric label: `variant` is the library's build
        (x86-64-v4-vnni, x86-64-v3, ...) or "torch" where no C code runs."""
        lib = self.library
        return {"variant": lib.variant if lib else "torch", "path": str(lib.path) if lib else None,
                "cpu_isa_cap": isa_cap(), "linear_f32_rows": self.linear_f32_rows,
                "linear_int8_rows": self.linear_int8_rows, "decode_step_rows": self.decode_step_rows,
                "decode_step_int8_rows": self.decode_step_int8_rows, "linear_block_rows": self.linear_block_rows,
                "linear_bf16_rows": self.linear_bf16_rows}


TORCH_CPU_KERNELS = CpuKernels(None)


def choose_cpu_kernels(mode: str, device: torch.device, dtype: torch.dtype) -> CpuKernels:
    """`mode` for a model on `device` in `dtype`: auto runs C where a library is built for this CPU and the
    model is float32 or bfloat16 on a CPU; native demands it (ValueError on a model it cannot run, RuntimeError
    where no library loads); torch runs none."""
    if mode not in CPU_KERNEL_MODES:
        raise ValueError(f"cpu_kernels {mode!r} is not one of {', '.join(CPU_KERNEL_MODES)}")
    runs_c = device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
    if mode == "native" and not runs_c:
        raise ValueError(f"the native CPU kernels (cpu_kernels native) run float32 and bfloat16 models on CPUs, not {dtype} "
                         f"on {device.type}: use cpu_kernels torch (or auto)")
    if mode == "torch" or not runs_c:
        return TORCH_CPU_KERNELS
    library = native_library()
    if library is None:
        if mode == "native":
            raise RuntimeError("cpu_kernels native: no native CPU kernels are built for this CPU (see the "
                               "warning above); use cpu_kernels auto or torch")
        return TORCH_CPU_KERNELS
    return CpuKernels.using(library, dtype)
