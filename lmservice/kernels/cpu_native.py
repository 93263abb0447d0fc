"""Native CPU kernels: C sources in lmservice/kernels/csrc, compiled on first use by the system's C compiler.

Why C and not torch ops: the torch decode attention (lmservice/kernels/attention.py) must gather every sequence's K
and V out of their blocks into one tensor before SDPA can read it, so at batch 32 each layer copies the
whole context twice. The C kernel reads the blocks in place through the block table. For decode steps of a
few rows, `linear_few_rows` reads each fp32 weight row once for all rows, at memory speed, where oneDNN's
small-M GEMM did not (lmservice/model/cpu_linear.py uses it), and `linear_few_rows_int8` multiplies packed
int8 weights by per-row-quantized activations on AVX-512 VNNI (lmservice/model/quantize.py). And
`NativeDecodeStep` runs a whole GPT-2 decode step in one call, where the op-by-op step spent ~6 ms of an
int8 step's ~15 in Python and dispatch (lmservice/engine/native_decode.py).

Build: `cc -O3 -march=native -ffast-math -fopenmp -c`, then `cc -shared` (see LDFLAGS), into a cache
directory ($LMSERVICE_KERNEL_CACHE, else $XDG_CACHE_HOME/lmservice/kernels, else ~/.cache/lmservice/kernels),
named by a hash of the source, the flags, the compiler and this CPU's model and flags, so a copy built for
another processor is never loaded. About a second, once per machine.
The library links libgomp by its soname, and torch has already loaded its own libgomp.so.1, so both share
one OpenMP runtime and one pool of threads (tests/kernels/test_native_attention.py checks that).

No compiler, or a failed build: a library prebuilt for this CPU's x86-64 level is loaded from
$LMSERVICE_PREBUILT_KERNELS if there is one (`python -m lmservice.kernels.cpu_native --prebuild DIR`, the container
image's build stage); else `native_library()` returns None, one warning is logged, and the engine keeps the
torch kernels. fp32 activations only; other dtypes use the torch path.
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

from lmservice.kernels.cpuinfo import cpu_flags, cpuinfo_field

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
_library_path: Path | None = None
_tried = False


def _cache_dir() -> Path:
    configured = os.environ.get("LMSERVICE_KERNEL_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmservice" / "kernels"


def _cpu_identity() -> str:
    """What -march=native compiles for: the CPU's model name and flags (Linux), else the platform."""
    if not cpuinfo_field("flags"):
        return platform.processor() or platform.machine()
    return f"{cpuinfo_field('model name')}|{cpuinfo_field('flags')}"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _compile(compiler: str, cflags: tuple[str, ...], target: Path) -> Path:
    """Compile SOURCE with `cflags` and link it into `target` (written atomically); returns target."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    obj = tmp + ".o"
    try:
        compile_, link = [compiler, *cflags, "-c", str(SOURCE), "-o", obj], [compiler, *LDFLAGS, obj, "-o", tmp, *_LIBS]
        for command in (compile_, link):
            subprocess.run(command, capture_output=True, text=True, check=True, timeout=120)
        os.chmod(tmp, 0o755)  # mkstemp's 0600 would keep other users (an image's non-root user) from loading it
        os.replace(tmp, target)  # atomic: a concurrent build of the same key writes the same bytes
    finally:
        for path in (tmp, obj):
            if os.path.exists(path):
                os.unlink(path)
    return target


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join(
        [SOURCE.read_text(), *CFLAGS, *LDFLAGS, *_LIBS, version, _cpu_identity()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"{SOURCE.stem}-{key}.so"
    return target if target.is_file() else _compile(compiler, CFLAGS, target)


# Builds for machines that cannot compile (a container image has no compiler at run time): one library per
# x86-64 level, made by `python -m lmservice.kernels.cpu_native --prebuild DIR` (the Dockerfile's build stage); where
# nothing compiles, native_library() loads the best one in $LMSERVICE_PREBUILT_KERNELS that this CPU runs.
# (name, the flags that replace -march=native, the /proc/cpuinfo flags the CPU needs), best first.
_V3 = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
PREBUILT_VARIANTS: tuple[tuple[str, tuple[str, ...], frozenset[str]], ...] = (
    ("x86-64-v4-vnni", ("-march=x86-64-v4", "-mavx512vnni", "-mtune=generic"),
     frozenset(_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx512_vnni"})),
    ("x86-64-v3", ("-march=x86-64-v3", "-mtune=generic"), frozenset(_V3)),
    ("x86-64", ("-march=x86-64", "-mtune=generic"), frozenset()),
)


def _prebuilt_name(variant: str) -> str:
    """Named by the source it was built from: a library of other source is never loaded."""
    return f"{SOURCE.stem}-{hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]}-{variant}.so"


def prebuild(directory: Path, compiler: str | None = None) -> list[Path]:
    """Build every PREBUILT_VARIANTS library into `directory` (x86-64 only); returns their paths."""
    compiler = compiler or _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler (cc) to prebuild the native kernels with")
    built = []
    for name, march, _ in PREBUILT_VARIANTS:
        cflags = tuple(f for f in CFLAGS if f != "-march=native") + march
        built.append(_compile(compiler, cflags, Path(directory) / _prebuilt_name(name)))
    return built


def best_prebuilt_variant(flags: frozenset[str]) -> str | None:
    """The best PREBUILT_VARIANTS entry a CPU with `flags` runs; None off x86-64."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    return next(name for name, _, needs in PREBUILT_VARIANTS if needs <= flags)


def _prebuilt() -> Path | None:
    directory = os.environ.get("LMSERVICE_PREBUILT_KERNELS")
    variant = best_prebuilt_variant(cpu_flags())
    if not directory or variant is None:
        return None
    path = Path(directory) / _prebuilt_name(variant)
    return path if path.is_file() else None


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    fn = lib.paged_decode_attention_f32
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [p, i64, p, p, p, i64, p, p, i64, i64, i64, i64, i64, ctypes.c_float, p, i64, ctypes.c_int]
    fn.restype = None
    fn = lib.linear_few_rows_f32
    fn.argtypes = [p, i64, i64, p, p, p, i64, ctypes.c_int]
    fn.restype = None
    lib.native_q8.argtypes, lib.native_q8.restype = [], ctypes.c_int
    if lib.native_q8():
        fn = lib.linear_few_rows_q8
        fn.argtypes = [p, i64, i64, p, p, p, p, p, i64, p, p, ctypes.c_int]
        fn.restype = None
    fn = lib.gpt2_decode_step
    fn.argtypes = [p, i64, p, p, ctypes.c_float, p, p, i64, i64, i64, i64, p, p, i64, p, i64, i64, i64, p, p, p,
                   ctypes.c_int]
    fn.restype = None
    return lib


def _find_library() -> tuple[ctypes.CDLL, Path] | None:
    compiler = _compiler()
    if compiler is None:
        problem = "no C compiler (cc)"
    else:
        try:
            path = _build(compiler)
            return _load(path), path
        except (OSError, subprocess.SubprocessError) as exc:
            problem = f"the build failed ({getattr(exc, 'stderr', '') or exc})"
    prebuilt = _prebuilt()
    if prebuilt is not None:
        log.info("native CPU kernels: %s; loading the prebuilt %s", problem, prebuilt)
        return _load(prebuilt), prebuilt
    log.warning("native CPU kernels: %s, and none prebuilt for this CPU in $LMSERVICE_PREBUILT_KERNELS: "
                "the engine stays on torch ops", problem)
    return None


def native_library() -> ctypes.CDLL | None:
    """The compiled kernels, built on the first call (or a prebuilt library, where nothing compiles); None
    where there are none (logged once)."""
    global _library, _library_path, _tried
    with _lock:
        if not _tried:
            _tried = True
            found = _find_library()
            if found is not None:
                _library, _library_path = found
        return _library


def library_path() -> Path | None:
    """The file native_library() loaded (after it was called)."""
    return _library_path


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
    """lmservice.kernels.attention.decode_attention_torch's contract, computed in C on fp32 CPU tensors.

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


# The op-by-op fp32 path (lmservice/model/cpu_linear.py) sends calls of at most this many rows here, oneDNN the
# rest: 1-4 rows streamed ~27 GB/s against oneDNN's 13-20 (AMD EPYC Zen 4, 2 threads). The decode step in
# C takes its linears here at any row count (up to lmservice/engine/native_decode.py's MAX_ROWS).
FEW_ROWS = 4


def linear_few_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight.T + bias for fp32 x (..., in) on a CPU, weight (out, in) contiguous: each weight row is
    read once for all rows (a decode step's projections and LM head). Meant for at most FEW_ROWS rows; more
    work (4 at a time), but oneDNN is faster there."""
    lib = native_library()
    assert lib is not None, "linear_few_rows without the native library (see native_library())"
    out_features, in_features = weight.shape
    x2 = x.reshape(-1, in_features).contiguous()
    assert x2.dtype == weight.dtype == torch.float32 and weight.is_contiguous()
    y = torch.empty(x2.shape[0], out_features, dtype=torch.float32)
    with _named("native::linear_few_rows"):
        lib.linear_few_rows_f32(x2.data_ptr(), x2.shape[0], in_features, weight.data_ptr(),
                                None if bias is None else bias.data_ptr(), y.data_ptr(), out_features,
                                torch.get_num_threads())
    return y.reshape(*x.shape[:-1], out_features)


def int8_kernel_available() -> bool:
    """Whether the library has the int8 x int8 linear (built for a CPU with AVX-512 VNNI)."""
    lib = native_library()
    return lib is not None and bool(lib.native_q8())


def pack_int8_weight(weight: torch.Tensor) -> torch.Tensor:
    """int8 (out, in) -> the layout linear_few_rows_int8 and the decode step read: (ceil(out / 16),
    ceil(in / 4), 16, 4), i.e. for each tile of 16 channels and each group of 4 inputs, 64 bytes holding
    those 4 inputs' weights for the 16 channels (zeros pad both)."""
    out_features, in_features = weight.shape
    tiles, groups = -(-out_features // 16), -(-in_features // 4)
    padded = torch.zeros(tiles * 16, groups * 4, dtype=torch.int8)
    padded[:out_features, :in_features] = weight
    return padded.view(tiles, 16, groups, 4).permute(0, 2, 1, 3).contiguous()


def unpack_int8_weight(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """pack_int8_weight's inverse: the (out, in) int8 weight."""
    tiles, groups = packed.shape[:2]
    return packed.permute(0, 2, 1, 3).reshape(tiles * 16, groups * 4)[:out_features, :in_features].contiguous()


def linear_few_rows_int8(x: torch.Tensor, packed: torch.Tensor, weight_sums: torch.Tensor, scales: torch.Tensor,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = quant(x) @ (W * scales[:, None]).T + bias for fp32 x (..., in), W int8 (out, in) given packed
    (pack_int8_weight) with one fp32 scale per output channel and `weight_sums` its int32 row sums (out,);
    each row of x quantized to int8 with its own scale (max |x| / 127, round half to even). Needs
    int8_kernel_available(). Faster than FBGEMM up to 32 rows here (docs/benchmarks.md); any number works."""
    lib = native_library()
    assert lib is not None and lib.native_q8(), "linear_few_rows_int8 needs the library's int8 kernel (VNNI)"
    out_features = weight_sums.shape[0]
    in_features = x.shape[-1]
    assert packed.dtype == torch.int8 and packed.is_contiguous() and packed.shape[1:] == (-(-in_features // 4), 16, 4)
    assert packed.shape[0] == -(-out_features // 16) and weight_sums.dtype == torch.int32
    assert scales.dtype == torch.float32 and scales.shape == (out_features,)
    x2 = x.reshape(-1, in_features).contiguous()
    rows = x2.shape[0]
    assert x2.dtype == torch.float32
    y = torch.empty(rows, out_features, dtype=torch.float32)
    xq, xs = torch.empty(rows * packed.shape[1] * 4, dtype=torch.uint8), torch.empty(rows, dtype=torch.float32)
    with _named("native::linear_few_rows_int8"):
        lib.linear_few_rows_q8(x2.data_ptr(), rows, in_features, packed.data_ptr(), weight_sums.data_ptr(),
                               scales.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(),
                               out_features, xq.data_ptr(), xs.data_ptr(), torch.get_num_threads())
    return y.reshape(*x.shape[:-1], out_features)


class _Linear(ctypes.Structure):  # native_linear in csrc/cpu_kernels.c
    _fields_ = [("w", ctypes.c_void_p), ("wq", ctypes.c_void_p), ("wsum", ctypes.c_void_p),
                ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("in_", ctypes.c_int64),
                ("out", ctypes.c_int64)]


class _Layer(ctypes.Structure):  # native_layer
    _fields_ = [("ln1_w", ctypes.c_void_p), ("ln1_b", ctypes.c_void_p), ("ln2_w", ctypes.c_void_p),
                ("ln2_b", ctypes.c_void_p), ("c_attn", _Linear), ("attn_proj", _Linear), ("c_fc", _Linear),
                ("mlp_proj", _Linear), ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p),
                ("attn_scale", ctypes.c_float)]


@dataclass
class LinearWeights:
    """One projection as gpt2_decode_step reads it: fp32 `weight` (out, in), or int8 packed (pack_int8_weight)
    with `scales`, `weight_sums` and its `in_features`."""

    weight: torch.Tensor  # fp32 (out, in) contiguous, or int8 packed
    bias: torch.Tensor | None
    scales: torch.Tensor | None = None  # int8: (out,) fp32
    weight_sums: torch.Tensor | None = None  # int8: (out,) int32
    in_features: int = 0  # int8: the unpadded input size


@dataclass
class LayerWeights:
    ln_1: tuple[torch.Tensor, torch.Tensor]  # weight, bias
    ln_2: tuple[torch.Tensor, torch.Tensor]
    c_attn: LinearWeights
    attn_proj: LinearWeights
    c_fc: LinearWeights
    mlp_proj: LinearWeights
    k_cache: torch.Tensor  # (num_blocks, block_size, n_head, head_dim) fp32 contiguous
    v_cache: torch.Tensor
    attn_scale: float


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class NativeDecodeStep:
    """A GPT-2 decode step in one C call (gpt2_decode_step): for each layer LayerNorm, c_attn, the KV write,
    paged attention, c_proj + residual, LayerNorm, c_fc, tanh GELU, c_proj + residual; then ln_f. For a few
    sequences, where a step is otherwise dominated by per-op Python and dispatch (any number works: the
    linears take the rows a few at a time). The tensors given are held (their pointers are baked in):
    weights and caches must not be reallocated."""

    def __init__(self, layers: list[LayerWeights], ln_f: tuple[torch.Tensor, torch.Tensor], eps: float,
                 n_head: int, n_inner: int) -> None:
        lib = native_library()
        assert lib is not None, "NativeDecodeStep without the native library (see native_library())"
        self._lib, self._keep = lib, (layers, ln_f)
        self.n_embd, self.n_head, self.n_inner, self.eps = ln_f[0].shape[0], n_head, n_inner, eps
        self.block_size = layers[0].k_cache.shape[1]
        specs = (_Layer * len(layers))()
        for spec, layer in zip(specs, layers, strict=True):
            assert layer.k_cache.is_contiguous() and layer.v_cache.is_contiguous()
            assert layer.k_cache.dtype == torch.float32
            spec.ln1_w, spec.ln1_b = _ptr(layer.ln_1[0]), _ptr(layer.ln_1[1])
            spec.ln2_w, spec.ln2_b = _ptr(layer.ln_2[0]), _ptr(layer.ln_2[1])
            for name in ("c_attn", "attn_proj", "c_fc", "mlp_proj"):
                setattr(spec, name, self._linear(getattr(layer, name)))
            spec.k_cache, spec.v_cache = _ptr(layer.k_cache), _ptr(layer.v_cache)
            spec.attn_scale = layer.attn_scale
        self._specs = specs
        self._work = torch.empty(0)
        self._qwork = torch.empty(0, dtype=torch.uint8)
        self._scratch = torch.empty(0)

    def _linear(self, lw: LinearWeights) -> _Linear:
        w = lw.weight
        assert w.is_contiguous() and (lw.bias is None or lw.bias.is_contiguous())
        if w.dtype == torch.int8:
            assert self._lib.native_q8(), "int8 weights need the library's int8 kernel (AVX-512 VNNI)"
            assert lw.scales is not None and lw.weight_sums is not None and lw.in_features > 0
            assert w.dim() == 4 and w.shape[1] == -(-lw.in_features // 4)
            return _Linear(None, _ptr(w), _ptr(lw.weight_sums), _ptr(lw.scales), _ptr(lw.bias), lw.in_features,
                           lw.weight_sums.shape[0])
        assert w.dtype == torch.float32
        return _Linear(_ptr(w), None, None, None, _ptr(lw.bias), w.shape[1], w.shape[0])

    def __call__(self, h: torch.Tensor, slots: torch.Tensor, seq_lens: torch.Tensor,
                 block_tables: torch.Tensor) -> torch.Tensor:
        """h (rows, n_embd): token + position embeddings (overwritten: the residual stream); slots (rows,)
        int64 cache slots (-1: not written); seq_lens (rows,) context lengths including the token;
        block_tables (rows, max_blocks). Returns ln_f of the last layer's output, (rows, n_embd)."""
        rows, c = h.shape
        assert h.dtype == torch.float32 and h.is_contiguous() and c == self.n_embd
        plan = plan_decode_native(seq_lens, block_tables, self.block_size)
        heads_per_item = -(-self.n_head // min(plan.items_per_seq, self.n_head))
        rows_held = max(rows, FEW_ROWS)
        if self._work.numel() < rows * (5 * c + self.n_inner):
            self._work = torch.empty(rows_held * (5 * c + self.n_inner))
            # rows padded to 4 bytes, then 64-byte aligned row scales: see gpt2_decode_step
            self._qwork = torch.empty(rows_held * (max(c, self.n_inner) + 8) + 128, dtype=torch.uint8)
        scratch = plan.threads * heads_per_item * plan.max_seq_len
        if self._scratch.numel() < scratch:
            self._scratch = torch.empty(max(scratch, 2 * self._scratch.numel()))
        slots = slots.to(torch.int64).contiguous()
        out = torch.empty(rows, c)
        ln_f = self._keep[1]
        with _named("native::gpt2_decode_step"):
            self._lib.gpt2_decode_step(
                ctypes.addressof(self._specs), len(self._specs), _ptr(ln_f[0]), _ptr(ln_f[1]), self.eps,
                h.data_ptr(), out.data_ptr(), rows, c, self.n_head, self.n_inner, slots.data_ptr(),
                plan.block_tables.data_ptr(), plan.block_tables.stride(0), plan.seq_lens.data_ptr(),
                self.block_size, heads_per_item, plan.max_seq_len, self._work.data_ptr(), self._qwork.data_ptr(),
                self._scratch.data_ptr(), plan.threads)
        return out


def main() -> None:
    import argparse  # noqa: PLC0415

    ap = argparse.ArgumentParser(description="Prebuild the native CPU kernels for every x86-64 level (for "
                                             "images without a compiler; see LMSERVICE_PREBUILT_KERNELS).")
    ap.add_argument("--prebuild", type=Path, required=True, metavar="DIR")
    args = ap.parse_args()
    if best_prebuilt_variant(frozenset()) is None:
        print(f"no prebuilt variants for {platform.machine()}: the server compiles the kernels where it runs")
        return
    for path in prebuild(args.prebuild):
        print(path)


if __name__ == "__main__":
    main()
