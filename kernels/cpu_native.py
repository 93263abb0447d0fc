"""Native CPU kernels: C sources in kernels/csrc, compiled on first use by the system's C compiler.

Why C and not torch ops: the torch decode attention (kernels/attention.py) must gather every sequence's K
and V out of their blocks into one tensor before SDPA can read it, so at batch 32 each layer copies the
whole context twice. The C kernel reads the blocks in place through the block table. And for decode steps
of a few rows, `linear_few_rows` reads each fp32 weight row once for all rows, at memory speed, where
oneDNN's small-M GEMM did not (service/model/cpu_linear.py uses it).

Build: `cc -O3 -march=native -ffast-math -fopenmp -c`, then `cc -shared` (see LDFLAGS), into a cache
directory ($LMSERVICE_KERNEL_CACHE, else $XDG_CACHE_HOME/lmservice/kernels, else ~/.cache/lmservice/kernels),
named by a hash of the source, the flags, the compiler and this CPU's model and flags, so a copy built for
another processor is never loaded. About a second, once per machine.
The library links libgomp by its soname, and torch has already loaded its own libgomp.so.1, so both share
one OpenMP runtime and one pool of threads (tests/kernels/test_native_attention.py checks that).

No compiler, or a failed build: `native_library()` returns None, one warning is logged, and the engine
keeps the torch kernels. The kernels are fp32 only; other dtypes use the torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import record_function

log = logging.getLogger(__name__)


def _named(name: str):
    """The call named in torch.profiler's tables while one records; otherwise nothing (record_function costs
    ~10 us a call, ~0.6 ms of a batch-1 step over its ~60 native calls)."""
    return record_function(name) if torch.autograd._profiler_enabled() else nullcontext()

SOURCE = Path(__file__).resolve().parent / "csrc" / "cpu_kernels.c"
CFLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC")
# NOTE: linked in a second step without -ffast-math: a shared object linked with it (gcc < 13) gets
# crtfastmath.o, whose constructor turns on flush-to-zero / denormals-are-zero for the whole process.
LDFLAGS = ("-shared", "-fopenmp")
_LIBS = ("-lm",)  # libm's linker script brings libmvec: the vector expf -ffast-math calls

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False


def _cache_dir() -> Path:
    configured = os.environ.get("LMSERVICE_KERNEL_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmservice" / "kernels"


def _cpu_identity() -> str:
    """What -march=native compiles for: the CPU's model name and flags (Linux), else the platform."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return f"{fields.get('model name', '')}|{fields.get('flags', '')}"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join(
        [SOURCE.read_text(), *CFLAGS, *LDFLAGS, *_LIBS, version, _cpu_identity()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"{SOURCE.stem}-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    obj = tmp + ".o"
    try:
        compile_, link = [compiler, *CFLAGS, "-c", str(SOURCE), "-o", obj], [compiler, *LDFLAGS, obj, "-o", tmp, *_LIBS]
        for command in (compile_, link):
            subprocess.run(command, capture_output=True, text=True, check=True, timeout=120)
        os.replace(tmp, target)  # atomic: a concurrent build of the same key writes the same bytes
    finally:
        for path in (tmp, obj):
            if os.path.exists(path):
                os.unlink(path)
    return target


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    fn = lib.paged_decode_attention_f32
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [p, i64, p, p, p, i64, p, p, i64, i64, i64, i64, i64, ctypes.c_float, p, i64, ctypes.c_int]
    fn.restype = None
    fn = lib.linear_few_rows_f32
    fn.argtypes = [p, i64, i64, p, p, p, i64, ctypes.c_int]
    fn.restype = None
    return lib


def native_library() -> ctypes.CDLL | None:
    """The compiled kernels, built on the first call; None where they cannot be built (logged once)."""
    global _library, _tried
    with _lock:
        if not _tried:
            _tried = True
            compiler = _compiler()
            if compiler is None:
                log.warning("no C compiler (cc): the CPU decode attention stays on torch ops")
            else:
                try:
                    _library = _load(_build(compiler))
                except (OSError, subprocess.SubprocessError) as exc:
                    detail = getattr(exc, "stderr", "") or exc
                    log.warning("native CPU kernels did not build (%s): staying on torch ops", detail)
        return _library


@dataclass
class NativeDecodePlan:
    """One step's decode metadata in the form the kernel reads, made once and shared by every layer."""

    seq_lens: torch.Tensor  # (num_seqs,) int32, contiguous
    block_tables: torch.Tensor  # (num_seqs, max_blocks) int32, contiguous
    max_seq_len: int
    threads: int
    items_per_seq: int  # head groups per sequence: 1 (whole rows) unless there are too few sequences
    scratch: torch.Tensor  # (threads * max_seq_len * heads per item,) fp32, allocated by the first layer


def plan_decode_native(seq_lens: torch.Tensor, block_tables: torch.Tensor, block_size: int) -> NativeDecodePlan:
    seq_lens = seq_lens.to(torch.int32).contiguous()
    threads = torch.get_num_threads()
    # whole token rows per item read memory in order; split the heads only to give every thread work
    items_per_seq = max(1, -(-2 * threads // seq_lens.shape[0]))
    return NativeDecodePlan(seq_lens, block_tables.to(torch.int32).contiguous(), int(seq_lens.max()), threads,
                            items_per_seq, torch.empty(0))


def decode_attention_native(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    plan: NativeDecodePlan | None = None,
) -> torch.Tensor:
    """kernels.attention.decode_attention_torch's contract, computed in C on fp32 CPU tensors.

    q: (num_seqs, num_heads, head_dim), heads packed (a view of the fused qkv is fine); caches
    (num_blocks, block_size, num_heads, head_dim) contiguous. Returns (num_seqs, num_heads, head_dim).
    """
    lib = native_library()
    assert lib is not None, "decode_attention_native without the native library (see native_library())"
    num_seqs, num_heads, head_dim = q.shape
    assert q.dtype == k_cache.dtype == v_cache.dtype == torch.float32, "the native kernel is fp32 only"
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape[2:] == (num_heads, head_dim)
    if q.stride(2) != 1 or q.stride(1) != head_dim:
        q = q.contiguous()
    if plan is None:
        plan = plan_decode_native(seq_lens, block_tables, k_cache.shape[1])
    out = torch.empty(num_seqs, num_heads, head_dim, dtype=torch.float32)
    heads_per_item = -(-num_heads // min(plan.items_per_seq, num_heads))
    scratch_size = plan.threads * heads_per_item * plan.max_seq_len
    if plan.scratch.numel() < scratch_size:
        plan.scratch = torch.empty(scratch_size, dtype=torch.float32)  # by the step's first layer
    with _named("native::paged_decode_attention"):
        lib.paged_decode_attention_f32(
            q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), plan.block_tables.data_ptr(),
            plan.block_tables.stride(0), plan.seq_lens.data_ptr(), out.data_ptr(), num_seqs, num_heads, head_dim,
            k_cache.shape[1], heads_per_item, scale, plan.scratch.data_ptr(), plan.max_seq_len, plan.threads)
    return out


# At most this many rows go to linear_few_rows: measured on an AMD EPYC (Zen 4), 2 threads, 40 weights of
# 3072 x 768: 1-4 rows streamed ~27 GB/s (oneDNN 13-20 GB/s), 8 rows fell to 9 GB/s (oneDNN 14).
FEW_ROWS = 4


def linear_few_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight.T + bias for x (..., in) of at most FEW_ROWS rows, fp32 on a CPU, weight (out, in)
    contiguous: each weight row is read once for all rows (a decode step's projections and LM head)."""
    lib = native_library()
    assert lib is not None, "linear_few_rows without the native library (see native_library())"
    out_features, in_features = weight.shape
    x2 = x.reshape(-1, in_features).contiguous()
    assert x2.shape[0] <= FEW_ROWS and x2.dtype == weight.dtype == torch.float32 and weight.is_contiguous()
    y = torch.empty(x2.shape[0], out_features, dtype=torch.float32)
    with _named("native::linear_few_rows"):
        lib.linear_few_rows_f32(x2.data_ptr(), x2.shape[0], in_features, weight.data_ptr(),
                                None if bias is None else bias.data_ptr(), y.data_ptr(), out_features,
                                torch.get_num_threads())
    return y.reshape(*x.shape[:-1], out_features)
