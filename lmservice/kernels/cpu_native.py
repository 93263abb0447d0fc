"""Native CPU kernels: C sources in lmservice/kernels/csrc, built ahead by the package's build, loaded here.

Why C and not torch ops: the torch decode attention (lmservice/kernels/attention.py) must gather every sequence's K
and V out of their blocks into one tensor before SDPA can read it, so at batch 32 each layer copies the
whole context twice; the C kernel reads the blocks in place through the block table. For decode steps of a
few rows, `linear_f32` reads each fp32 weight row once for all rows, at memory speed, where oneDNN's
small-M GEMM does not; `linear_int8` multiplies packed int8 weights by per-row-quantized activations
(AVX-512 VNNI, or AVX2's vpmaddubsw), and `linear_block` weights in blocks of 32 inputs with a scale each, 8 or 4
bits (--quantization int4), by activations quantized in blocks of 32 too. And `NativeDecodeStep` runs a whole GPT-2 decode step in one call, with no Python and no
dispatch per op (lmservice/engine/native_decode.py). docs/kernels.md has the measurements.

Which library: `native_library()` loads, once per process, the best variant (lmservice/kernels/native_build.py)
that this CPU's flags (lmservice/kernels/cpuinfo.py, capped by LMSERVICE_CPU_ISA) run, from
$LMSERVICE_PREBUILT_KERNELS if set, else from the package's _native/ folder, where `pip install` built
them. With LMSERVICE_NATIVE_BUILD=1 (for developers editing the C sources) it first compiles them with
-march=native into $LMSERVICE_KERNEL_CACHE (else $XDG_CACHE_HOME/lmservice/kernels). None found: one
warning, and the engine runs on torch ops.

The ABI: csrc/cpu_kernels.h declares the functions and structs; this module declares them again with
ctypes, and `load_library` refuses a library whose ABI version or struct layout differs (NativeLibraryError).
The library links libgomp by its soname, and torch has already loaded its own libgomp.so.1, so both share
one OpenMP runtime and one pool of threads (tests/kernels/test_native_attention.py checks that).
fp32 activations only; weights fp32, bfloat16 (widened as they are read: a bf16 model's decode step and LM head) or
quantized. The KV cache may be stored in any --kv-cache-dtype
(KV_DTYPE_CODES): the attention widens it as it reads, the decode step's write converts.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import subprocess
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import record_function

from lmservice.kernels import native_build
from lmservice.kernels.cpuinfo import cpu_flags, cpuinfo_field, isa_cap

log = logging.getLogger(__name__)

ABI_VERSION = 4  # LMSERVICE_KERNELS_ABI_VERSION in csrc/cpu_kernels.h
# the KV-cache formats the kernels read and write (KV_F32 ... KV_I8 in csrc/cpu_kernels.h; kv_cache.py)
KV_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int8: 3}
DEVELOPER_BUILD = "native"  # the variant name of a LMSERVICE_NATIVE_BUILD library
INT8_KERNELS = {2: "vnni", 1: "avx2"}  # native_q8()'s answers: which int8 x int8 kernel a build has
_INT8_FUNCTIONS = ("linear_few_rows_q8", "linear_few_rows_qblock")  # absent where it has none
QBLOCK = 32  # inputs per scale of a block-quantized weight (QBLOCK in csrc/cpu_kernels.c)


class NativeLibraryError(RuntimeError):
    """A library that does not match this module's declarations of csrc/cpu_kernels.h."""


def _named(name: str):
    """The call named in torch.profiler's tables while one records; otherwise nothing: record_function costs
    more than a small C call itself (docs/kernels.md)."""
    return record_function(name) if torch.autograd._profiler_enabled() else nullcontext()


class _Linear(ctypes.Structure):  # native_linear in csrc/cpu_kernels.h
    _fields_ = [("w", ctypes.c_void_p), ("wq", ctypes.c_void_p), ("wsum", ctypes.c_void_p),
                ("scale", ctypes.c_void_p), ("bscale", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("in_", ctypes.c_int64), ("out", ctypes.c_int64), ("bits", ctypes.c_int64), ("wb", ctypes.c_void_p)]


class _Layer(ctypes.Structure):  # native_layer
    _fields_ = [("ln1_w", ctypes.c_void_p), ("ln1_b", ctypes.c_void_p), ("ln2_w", ctypes.c_void_p),
                ("ln2_b", ctypes.c_void_p), ("c_attn", _Linear), ("attn_proj", _Linear), ("c_fc", _Linear),
                ("mlp_proj", _Linear), ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p),
                ("k_scales", ctypes.c_void_p), ("v_scales", ctypes.c_void_p), ("kv_dtype", ctypes.c_int64),
                ("attn_scale", ctypes.c_float)]


def _layout() -> list[int]:
    """What native_abi_layout must report: each struct's size, then its fields' offsets in order."""
    out: list[int] = []
    for struct in (_Linear, _Layer):
        out += [ctypes.sizeof(struct), *(getattr(struct, name).offset for name, _ in struct._fields_)]
    return out


_P, _I64, _INT, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {  # name: (argtypes, restype), as csrc/cpu_kernels.h declares them
    "paged_decode_attention": ([_P, _I64, _P, _P, _P, _P, _I64, _P, _I64, _P, _P, _I64, _I64, _I64, _I64, _I64, _F,
                                _P, _I64, _INT], None),
    "write_kv_cache": ([_P, _P, _I64, _I64, _P, _P, _P, _P, _P, _I64, _I64, _I64], None),
    "linear_few_rows_f32": ([_P, _I64, _I64, _P, _P, _P, _I64, _INT], None),
    "linear_few_rows_bf16": ([_P, _I64, _I64, _P, _P, _P, _I64, _INT], None),
    "linear_few_rows_q8": ([_P, _I64, _I64, _P, _P, _P, _P, _P, _I64, _P, _P, _INT], None),
    "linear_few_rows_qblock": ([_P, _I64, _I64, _P, _P, _I64, _P, _P, _I64, _P, _P, _P, _INT], None),
    "gpt2_decode_step": ([_P, _I64, _P, _P, _F, _P, _P, _I64, _I64, _I64, _I64, _P, _P, _I64, _P, _I64, _I64, _I64,
                          _P, _P, _P, _INT], None),
}


def load_library(path: Path, variant: str) -> NativeLibrary:
    """Load one built library, checking its ABI against this module's declarations."""
    lib = ctypes.CDLL(str(path))
    try:
        version_fn, layout_fn = lib.native_abi_version, lib.native_abi_layout
    except AttributeError:
        raise NativeLibraryError(f"{path}: no native_abi_version(): built from sources older than the ABI "
                                 "check; rebuild it (python -m lmservice.kernels)") from None
    version_fn.argtypes, version_fn.restype = [], _I64
    layout_fn.argtypes, layout_fn.restype = [_P, _I64], _I64
    if version_fn() != ABI_VERSION:
        raise NativeLibraryError(f"{path}: ABI version {version_fn()}, this lmservice declares {ABI_VERSION}: "
                                 "the library and the Python package come from different sources")
    want = _layout()
    got = (ctypes.c_int64 * 64)()
    got = list(got[:min(layout_fn(got, 64), 64)])
    if got != want:
        raise NativeLibraryError(f"{path}: struct layout {got} differs from the ctypes declarations {want} "
                                 "(ABI version equal: was csrc/cpu_kernels.h changed without bumping it?)")
    lib.native_q8.argtypes, lib.native_q8.restype = [], _INT
    int8_kernel = INT8_KERNELS.get(lib.native_q8())
    for name, (argtypes, restype) in _SIGNATURES.items():
        if name in _INT8_FUNCTIONS and int8_kernel is None:
            continue
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return NativeLibrary(lib, Path(path), variant, int8_kernel)


# ---- finding the library

_lock = threading.Lock()
_library: NativeLibrary | None = None
_tried = False


def _developer_build() -> Path:
    """-march=native into the cache, keyed by the sources, the compiler and this CPU (LMSERVICE_NATIVE_BUILD)."""
    compiler = native_build.find_compiler()
    if compiler is None:
        raise FileNotFoundError("no C compiler (cc, gcc or $CC)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    identity = f"{cpuinfo_field('model name')}|{cpuinfo_field('flags')}"
    key = hashlib.sha256("\0".join([native_build.source_digest(), compiler, version, identity]).encode())
    configured = os.environ.get("LMSERVICE_KERNEL_CACHE")
    cache = Path(configured) if configured else (
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmservice" / "kernels")
    target = cache / f"{native_build.SOURCE.stem}-{key.hexdigest()[:16]}-{DEVELOPER_BUILD}.so"
    return target if target.is_file() else native_build.compile_library(target, ("-march=native",), compiler)


def _directories() -> list[Path]:
    configured = os.environ.get("LMSERVICE_PREBUILT_KERNELS")
    return [Path(configured)] if configured else [native_build.PACKAGE_DIR]


def _find_library() -> NativeLibrary | None:
    if os.environ.get("LMSERVICE_NATIVE_BUILD", "") not in ("", "0"):
        if isa_cap() is not None:
            log.info("native CPU kernels: LMSERVICE_NATIVE_BUILD is ignored under LMSERVICE_CPU_ISA=%s", isa_cap())
        else:
            try:
                return load_library(_developer_build(), DEVELOPER_BUILD)
            except (OSError, subprocess.SubprocessError) as exc:
                log.warning("native CPU kernels: the -march=native build failed (%s); looking for prebuilt ones",
                            getattr(exc, "stderr", "") or exc)
    flags = cpu_flags()
    for directory in _directories():
        for variant in native_build.variants():
            path = directory / native_build.library_name(variant.name)
            if variant.needs <= flags and path.is_file():
                return load_library(path, variant.name)
    stale = [p.name for d in _directories() for p in sorted(d.glob(f"{native_build.SOURCE.stem}-*.so"))]
    why = (f"those in {', '.join(map(str, _directories()))} were built from other sources ({', '.join(stale)})"
           if stale else f"none were built into {', '.join(map(str, _directories()))} (no C compiler at install time?)")
    log.warning("native CPU kernels: %s; the engine runs on torch ops. Build them with "
                "`python -m lmservice.kernels` (or reinstall the package with a C compiler)", why)
    return None


def native_library() -> NativeLibrary | None:
    """The kernels for this CPU, loaded on the first call; None where there are none (logged once)."""
    global _library, _tried
    with _lock:
        if not _tried:
            _tried = True
            _library = _find_library()
        return _library


def int8_kernel_available() -> bool:
    """Whether the library has the int8 x int8 linear (built for a CPU with AVX2 or AVX-512 VNNI)."""
    lib = native_library()
    return lib is not None and lib.has_int8


# ---- the kernels


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


def pack_int8_weight(weight: torch.Tensor) -> torch.Tensor:
    """int8 (out, in) -> the layout linear_int8 and the decode step read: (ceil(out / 16), ceil(in / 4), 16, 4),
    i.e. for each tile of 16 channels and each group of 4 inputs, 64 bytes holding those 4 inputs' weights
    for the 16 channels (zeros pad both)."""
    out_features, in_features = weight.shape
    tiles, groups = -(-out_features // 16), -(-in_features // 4)
    padded = torch.zeros(tiles * 16, groups * 4, dtype=torch.int8)
    padded[:out_features, :in_features] = weight
    return padded.view(tiles, 16, groups, 4).permute(0, 2, 1, 3).contiguous()


def unpack_int8_weight(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """pack_int8_weight's inverse: the (out, in) int8 weight."""
    tiles, groups = packed.shape[:2]
    return packed.permute(0, 2, 1, 3).reshape(tiles * 16, groups * 4)[:out_features, :in_features].contiguous()


def quantize_blocks(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (out, in) -> (q, scales): q (out, in) int8 in -127..127 (bits 8) or -8..7 (bits 4), scales
    (out, ceil(in / QBLOCK)) fp16, one per block of QBLOCK inputs of a channel; weight ~ q * scale.
    8 bits: scale max |w| / 127. 4 bits, as llama.cpp's q4_0: the block's value of largest magnitude maps to -8
    (scale = that value / -8), so both ends of the 16 levels are used. The fp16 scale is rounded before the
    weights are divided by it, so its rounding costs no accuracy beyond a clamp; a block whose scale underflows
    fp16 (|w| < 1e-5 or so) becomes zeros."""
    out_features, in_features = weight.shape
    nblocks = -(-in_features // QBLOCK)
    blocks = torch.zeros(out_features, nblocks * QBLOCK)
    blocks[:, :in_features] = weight
    blocks = blocks.view(out_features, nblocks, QBLOCK)  # (out, blocks, QBLOCK)
    if bits == 8:
        scale = blocks.abs().amax(dim=2) / 127.0
        low, high = -127, 127
    elif bits == 4:
        idx = blocks.abs().argmax(dim=2, keepdim=True)
        scale = blocks.gather(2, idx).squeeze(2) / -8.0
        low, high = -8, 7
    else:
        raise ValueError(f"bits {bits}: 8 or 4")
    scale = scale.half()
    divisor = scale.float().unsqueeze(2)
    q = torch.where(divisor != 0, torch.round(blocks / torch.where(divisor != 0, divisor, 1.0)), 0.0)
    q = q.clamp_(low, high).to(torch.int8).view(out_features, nblocks * QBLOCK)[:, :in_features]
    return q.contiguous(), scale.contiguous()


def dequantize_blocks(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """quantize_blocks' (q, scales) -> the fp32 (out, in) weight they stand for."""
    out_features, in_features = q.shape
    per_input = scales.float().repeat_interleave(QBLOCK, dim=1)[:, :in_features]
    return q.float() * per_input


def pack_block_weight(q: torch.Tensor, scales: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_blocks' (q, scales) -> what linear_block and the decode step read: the weights as bytes
    (ceil(out / 16), blocks, QBLOCK * 16 * bits / 8) and the scales (ceil(out / 16), blocks, 16) fp16. In each
    16-channel tile and block, groups of 4 inputs x 16 channels (64 values) in order, as pack_int8_weight lays them
    out, stored unsigned: q + 128 (bits 8), or q + 8 in nibbles, two groups per 64 bytes, the even one low."""
    out_features, in_features = q.shape
    tiles, nblocks = -(-out_features // 16), scales.shape[1]
    offset = 128 if bits == 8 else 8
    padded = torch.full((tiles * 16, nblocks * QBLOCK), offset, dtype=torch.int16)
    padded[:out_features, :in_features] = q.to(torch.int16) + offset
    groups = padded.view(tiles, 16, nblocks * QBLOCK // 4, 4).permute(0, 2, 1, 3)  # (tiles, groups, 16, 4)
    groups = groups.reshape(tiles, nblocks, QBLOCK // 4, 64)
    if bits == 4:
        groups = groups[:, :, 0::2] | (groups[:, :, 1::2] << 4)  # (tiles, blocks, 4, 64)
    packed = groups.to(torch.uint8).reshape(tiles, nblocks, -1).contiguous()
    tile_scales = torch.zeros(tiles * 16, nblocks, dtype=torch.float16)
    tile_scales[:out_features] = scales
    return packed, tile_scales.view(tiles, 16, nblocks).transpose(1, 2).contiguous()


def unpack_block_weight(packed: torch.Tensor, tile_scales: torch.Tensor, bits: int, out_features: int,
                        in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """pack_block_weight's inverse: (q (out, in) int8, scales (out, blocks) fp16)."""
    tiles, nblocks = packed.shape[:2]
    groups = packed.to(torch.int16)
    if bits == 4:  # (tiles, blocks, 4, 64) -> (tiles, blocks, 8, 64): low nibbles the even groups
        groups = torch.stack([groups.view(tiles, nblocks, 4, 64) & 15, groups.view(tiles, nblocks, 4, 64) >> 4], dim=3)
    groups = groups.reshape(tiles, nblocks * QBLOCK // 4, 16, 4).permute(0, 2, 1, 3).reshape(tiles * 16, -1)
    q = (groups - (128 if bits == 8 else 8)).to(torch.int8)[:out_features, :in_features].contiguous()
    return q, tile_scales.transpose(1, 2).reshape(tiles * 16, nblocks)[:out_features].contiguous()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _kv_code(k_cache: torch.Tensor, v_cache: torch.Tensor, k_scales: torch.Tensor | None,
             v_scales: torch.Tensor | None) -> int:
    """The kernels' code for a cache's format (KV_DTYPE_CODES), after checking what they assume of its tensors."""
    assert k_cache.device.type == "cpu" and k_cache.dtype in KV_DTYPE_CODES, f"a {k_cache.dtype} KV cache"
    assert v_cache.dtype == k_cache.dtype and v_cache.shape == k_cache.shape
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    if k_cache.dtype == torch.int8:
        assert k_scales is not None and v_scales is not None, "an int8 KV cache needs its scales"
        for scales in (k_scales, v_scales):
            assert scales.dtype == torch.float32 and scales.is_contiguous() and scales.shape == k_cache.shape[:3]
    else:
        assert k_scales is None and v_scales is None, "scales belong to an int8 KV cache"
    return KV_DTYPE_CODES[k_cache.dtype]


class NativeLibrary:
    """One loaded, ABI-checked build of csrc/cpu_kernels.c: its kernels on tensors. `variant` names the build
    (native_build.Variant.name, or "native" for a LMSERVICE_NATIVE_BUILD one); `int8_kernel` its int8 x int8
    linear: "vnni" (AVX-512 VNNI), "avx2" (vpmaddubsw; the same results, more instructions per product) or None."""

    def __init__(self, lib: ctypes.CDLL, path: Path, variant: str, int8_kernel: str | None) -> None:
        self.lib, self.path, self.variant, self.int8_kernel = lib, path, variant, int8_kernel

    @property
    def has_int8(self) -> bool:
        return self.int8_kernel is not None

    def __repr__(self) -> str:
        return f"NativeLibrary({self.variant}, {self.path})"

    def decode_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                         block_tables: torch.Tensor, scale: float, plan: NativeDecodePlan | None = None,
                         k_scales: torch.Tensor | None = None, v_scales: torch.Tensor | None = None) -> torch.Tensor:
        """lmservice.kernels.attention.decode_attention_torch's contract, computed in C on CPU queries.

        q: (num_seqs, num_heads, head_dim), heads packed (a view of the fused qkv is fine), fp32 or bf16 (a bf16
        model's op-by-op steps: widened, and the output rounded back to bf16; the kernel computes in fp32); caches
        (num_blocks, block_size, num_heads, head_dim) contiguous, fp32, fp16, bf16 or int8 (with k_scales,
        v_scales (num_blocks, block_size, num_heads) fp32). Returns (num_seqs, num_heads, head_dim) in q's dtype.
        """
        if q.dtype == torch.bfloat16:
            out = self.decode_attention(q.float(), k_cache, v_cache, seq_lens, block_tables, scale, plan, k_scales,
                                        v_scales)
            return out.to(torch.bfloat16)
        num_seqs, num_heads, head_dim = q.shape
        assert q.dtype == torch.float32, "the native kernel takes fp32 or bf16 queries"
        kv_dtype = _kv_code(k_cache, v_cache, k_scales, v_scales)
        assert k_cache.shape[2:] == (num_heads, head_dim)
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
            self.lib.paged_decode_attention(
                q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), _ptr(k_scales), _ptr(v_scales),
                kv_dtype, plan.block_tables.data_ptr(), plan.block_tables.stride(0), plan.seq_lens.data_ptr(),
                out.data_ptr(), num_seqs, num_heads, head_dim, k_cache.shape[1], heads_per_item, scale,
                plan.scratch.data_ptr(), plan.max_seq_len, plan.threads)
        return out

    def write_kv_cache(self, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor, k_scales: torch.Tensor | None = None,
                       v_scales: torch.Tensor | None = None) -> None:
        """lmservice.kernels.kv_cache.write_kv_cache_torch's contract in C, for fp32 key and value (num_tokens,
        num_heads, head_dim) whose rows are contiguous and share one stride (views of the fused qkv are fine):
        the decode step's write, callable alone."""
        num_tokens, num_heads, head_dim = key.shape
        assert key.dtype == value.dtype == torch.float32 and key.stride() == value.stride()
        assert key.stride(2) == 1 and key.stride(1) == head_dim, "each token's heads packed"
        kv_dtype = _kv_code(k_cache, v_cache, k_scales, v_scales)
        slots = slot_mapping.to(torch.int64).contiguous()
        with _named("native::write_kv_cache"):
            self.lib.write_kv_cache(key.data_ptr(), value.data_ptr(), key.stride(0), num_tokens, slots.data_ptr(),
                                    k_cache.data_ptr(), v_cache.data_ptr(), _ptr(k_scales), _ptr(v_scales), kv_dtype,
                                    num_heads, head_dim)

    def linear_f32(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """y = x @ weight.T + bias for fp32 x (..., in) on a CPU, weight (out, in) contiguous: each weight row is
        read once for all rows (a decode step's projections and LM head). Any number of rows works; past a
        few (CpuKernels.linear_f32_rows) oneDNN is faster."""
        out_features, in_features = weight.shape
        x2 = x.reshape(-1, in_features).contiguous()
        assert x2.dtype == weight.dtype == torch.float32 and weight.is_contiguous()
        y = torch.empty(x2.shape[0], out_features, dtype=torch.float32)
        with _named("native::linear_few_rows"):
            self.lib.linear_few_rows_f32(x2.data_ptr(), x2.shape[0], in_features, weight.data_ptr(), _ptr(bias),
                                         y.data_ptr(), out_features, torch.get_num_threads())
        return y.reshape(*x.shape[:-1], out_features)

    def linear_bf16(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """linear_f32 with a bfloat16 weight (out, in), contiguous: x (..., in) is taken as fp32 (a bf16 x is
        widened first) and y is fp32, the products and sums fp32; `bias` fp32 or bf16. Reads half the bytes of
        fp32 weights: a bf16 model's LM head at a few rows."""
        out_features, in_features = weight.shape
        x2 = x.reshape(-1, in_features).to(torch.float32).contiguous()
        assert weight.dtype == torch.bfloat16 and weight.is_contiguous()
        if bias is not None:
            bias = bias.to(torch.float32).contiguous()
        y = torch.empty(x2.shape[0], out_features, dtype=torch.float32)
        with _named("native::linear_few_rows_bf16"):
            self.lib.linear_few_rows_bf16(x2.data_ptr(), x2.shape[0], in_features, weight.data_ptr(), _ptr(bias),
                                          y.data_ptr(), out_features, torch.get_num_threads())
        return y.reshape(*x.shape[:-1], out_features)

    def linear_int8(self, x: torch.Tensor, packed: torch.Tensor, weight_sums: torch.Tensor, scales: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
        """y = quant(x) @ (W * scales[:, None]).T + bias for fp32 x (..., in), W int8 (out, in) given packed
        (pack_int8_weight) with one fp32 scale per output channel and `weight_sums` its int32 row sums (out,);
        each row of x quantized to int8 with its own scale (max |x| / 127, round half to even). Needs
        has_int8. Any number of rows works."""
        assert self.has_int8, f"the {self.variant} build has no int8 kernel (it needs AVX2)"
        out_features = weight_sums.shape[0]
        in_features = x.shape[-1]
        assert packed.dtype == torch.int8 and packed.is_contiguous()
        assert packed.shape[1:] == (-(-in_features // 4), 16, 4) and packed.shape[0] == -(-out_features // 16)
        assert weight_sums.dtype == torch.int32 and scales.dtype == torch.float32 and scales.shape == (out_features,)
        x2 = x.reshape(-1, in_features).contiguous()
        rows = x2.shape[0]
        assert x2.dtype == torch.float32
        y = torch.empty(rows, out_features, dtype=torch.float32)
        xq, xs = torch.empty(rows * packed.shape[1] * 4, dtype=torch.uint8), torch.empty(rows, dtype=torch.float32)
        with _named("native::linear_few_rows_int8"):
            self.lib.linear_few_rows_q8(x2.data_ptr(), rows, in_features, packed.data_ptr(), weight_sums.data_ptr(),
                                        scales.data_ptr(), _ptr(bias), y.data_ptr(), out_features, xq.data_ptr(),
                                        xs.data_ptr(), torch.get_num_threads())
        return y.reshape(*x.shape[:-1], out_features)


    def linear_block(self, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bits: int, out_features: int,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
        """y = quant(x) @ W.T + bias for fp32 x (..., in), W in blocks of QBLOCK inputs with fp16 scales, 8 or 4
        bits, packed by pack_block_weight; x quantized in blocks of QBLOCK inputs too (symmetric int8, each with
        its scale max |x| / 127). Needs has_int8. Any number of rows works."""
        assert self.has_int8, f"the {self.variant} build has no int8 kernel (it needs AVX2)"
        in_features = x.shape[-1]
        tiles, nblocks = -(-out_features // 16), -(-in_features // QBLOCK)
        assert bits in (4, 8) and packed.dtype == torch.uint8 and packed.is_contiguous()
        assert packed.shape == (tiles, nblocks, QBLOCK * 16 * bits // 8)
        assert scales.dtype == torch.float16 and scales.shape == (tiles, nblocks, 16) and scales.is_contiguous()
        x2 = x.reshape(-1, in_features).contiguous()
        rows = x2.shape[0]
        assert x2.dtype == torch.float32
        y = torch.empty(rows, out_features, dtype=torch.float32)
        xq, xs = torch.empty(rows * nblocks * QBLOCK, dtype=torch.uint8), torch.empty(rows * nblocks)
        xsum = torch.empty(rows * nblocks, dtype=torch.int32)
        with _named("native::linear_few_rows_qblock"):
            self.lib.linear_few_rows_qblock(x2.data_ptr(), rows, in_features, packed.data_ptr(), scales.data_ptr(),
                                            bits, _ptr(bias), y.data_ptr(), out_features, xq.data_ptr(),
                                            xs.data_ptr(), xsum.data_ptr(), torch.get_num_threads())
        return y.reshape(*x.shape[:-1], out_features)


# ---- the whole decode step


@dataclass
class LinearWeights:
    """One projection as gpt2_decode_step reads it: fp32 or bf16 `weight` (out, in) with an fp32 bias; or int8 packed (pack_int8_weight)
    with `scales`, `weight_sums` and its `in_features`; or blocks (pack_block_weight: uint8 `weight`, fp16
    `scales`, `bits`, `in_features` and `out_features`)."""

    weight: torch.Tensor  # fp32 or bf16 (out, in) contiguous, or int8 packed, or uint8 blocks
    bias: torch.Tensor | None
    scales: torch.Tensor | None = None  # int8: (out,) fp32; blocks: (tiles, blocks, 16) fp16
    weight_sums: torch.Tensor | None = None  # int8: (out,) int32
    in_features: int = 0  # quantized: the unpadded input size
    bits: int = 0  # blocks: 8 or 4
    out_features: int = 0  # blocks: the unpadded output size

    @property
    def is_int8(self) -> bool:
        """Quantized: computed by the int8 x int8 kernels (per-channel int8, or blocks of 8 or 4 bits)."""
        return self.weight.dtype in (torch.int8, torch.uint8)


@dataclass
class LayerWeights:
    ln_1: tuple[torch.Tensor, torch.Tensor]  # weight, bias
    ln_2: tuple[torch.Tensor, torch.Tensor]
    c_attn: LinearWeights
    attn_proj: LinearWeights
    c_fc: LinearWeights
    mlp_proj: LinearWeights
    k_cache: torch.Tensor  # (num_blocks, block_size, n_head, head_dim) contiguous, fp32, fp16, bf16 or int8
    v_cache: torch.Tensor
    attn_scale: float
    k_scales: torch.Tensor | None = None  # int8 caches: (num_blocks, block_size, n_head) fp32
    v_scales: torch.Tensor | None = None

    @property
    def linears(self) -> tuple[LinearWeights, ...]:
        return self.c_attn, self.attn_proj, self.c_fc, self.mlp_proj


@dataclass
class DecodeStepWeights:
    """Everything gpt2_decode_step reads of a model (GPT2ForServing.decode_step_weights makes it)."""

    layers: list[LayerWeights]
    ln_f: tuple[torch.Tensor, torch.Tensor]
    eps: float
    n_head: int
    n_inner: int

    @property
    def is_int8(self) -> bool:
        """Any projection quantized: the step needs the library's int8 kernel."""
        return any(lw.is_int8 for layer in self.layers for lw in layer.linears)

    @property
    def has_channel_int8(self) -> bool:
        """Any projection in per-channel int8 (whose op-by-op alternative is FBGEMM, not the C kernel)."""
        return any(lw.is_int8 and not lw.bits for layer in self.layers for lw in layer.linears)


class NativeDecodeStep:
    """A GPT-2 decode step in one C call (gpt2_decode_step): for each layer LayerNorm, c_attn, the KV write,
    paged attention, c_proj + residual, LayerNorm, c_fc, tanh GELU, c_proj + residual; then ln_f. For a few
    sequences, where a step is otherwise dominated by per-op Python and dispatch (any number works: the
    linears take the rows a few at a time). The tensors given are held (their pointers are baked in):
    weights and caches must not be reallocated."""

    def __init__(self, library: NativeLibrary, weights: DecodeStepWeights) -> None:
        assert library.has_int8 or not weights.is_int8, f"the {library.variant} build has no int8 kernel"
        layers, ln_f = weights.layers, weights.ln_f
        self._lib, self._keep = library.lib, weights
        self.n_embd, self.n_head, self.n_inner, self.eps = ln_f[0].shape[0], weights.n_head, weights.n_inner, weights.eps
        self.block_size = layers[0].k_cache.shape[1]
        specs = (_Layer * len(layers))()
        for spec, layer in zip(specs, layers, strict=True):
            kv_dtype = _kv_code(layer.k_cache, layer.v_cache, layer.k_scales, layer.v_scales)
            spec.ln1_w, spec.ln1_b = _ptr(layer.ln_1[0]), _ptr(layer.ln_1[1])
            spec.ln2_w, spec.ln2_b = _ptr(layer.ln_2[0]), _ptr(layer.ln_2[1])
            for name in ("c_attn", "attn_proj", "c_fc", "mlp_proj"):
                setattr(spec, name, self._linear(getattr(layer, name)))
            spec.k_cache, spec.v_cache = _ptr(layer.k_cache), _ptr(layer.v_cache)
            spec.k_scales, spec.v_scales, spec.kv_dtype = _ptr(layer.k_scales), _ptr(layer.v_scales), kv_dtype
            spec.attn_scale = layer.attn_scale
        self._specs = specs
        self._work = torch.empty(0)
        self._qwork = torch.empty(0, dtype=torch.uint8)
        self._scratch = torch.empty(0)

    @staticmethod
    def _linear(lw: LinearWeights) -> _Linear:
        w = lw.weight
        assert w.is_contiguous() and (lw.bias is None or lw.bias.is_contiguous())
        if lw.bits:
            assert lw.scales is not None and lw.scales.dtype == torch.float16 and w.dtype == torch.uint8
            assert w.shape[1] == -(-lw.in_features // QBLOCK) and lw.out_features > 0
            return _Linear(None, _ptr(w), None, None, _ptr(lw.scales), _ptr(lw.bias), lw.in_features, lw.out_features,
                           lw.bits, None)
        if lw.is_int8:
            assert lw.scales is not None and lw.weight_sums is not None and lw.in_features > 0
            assert w.dim() == 4 and w.shape[1] == -(-lw.in_features // 4)
            return _Linear(None, _ptr(w), _ptr(lw.weight_sums), _ptr(lw.scales), None, _ptr(lw.bias), lw.in_features,
                           lw.weight_sums.shape[0], 0, None)
        assert lw.bias is None or lw.bias.dtype == torch.float32
        if w.dtype == torch.bfloat16:
            return _Linear(None, None, None, None, None, _ptr(lw.bias), w.shape[1], w.shape[0], 0, _ptr(w))
        assert w.dtype == torch.float32
        return _Linear(_ptr(w), None, None, None, None, _ptr(lw.bias), w.shape[1], w.shape[0], 0, None)

    def __call__(self, h: torch.Tensor, slots: torch.Tensor, seq_lens: torch.Tensor,
                 block_tables: torch.Tensor) -> torch.Tensor:
        """h (rows, n_embd): token + position embeddings (overwritten: the residual stream); slots (rows,)
        int64 cache slots (-1: not written); seq_lens (rows,) context lengths including the token;
        block_tables (rows, max_blocks). Returns ln_f of the last layer's output, (rows, n_embd)."""
        rows, c = h.shape
        assert h.dtype == torch.float32 and h.is_contiguous() and c == self.n_embd
        plan = plan_decode_native(seq_lens, block_tables, self.block_size)
        heads_per_item = -(-self.n_head // min(plan.items_per_seq, self.n_head))
        if self._work.numel() < rows * (5 * c + self.n_inner):
            rows_held = max(rows, 4)  # grown rarely: a step of 1 row, then 2, ... reallocates once
            self._work = torch.empty(rows_held * (5 * c + self.n_inner))
            # quantized rows, then 64-byte aligned row scales and block sums: see gpt2_decode_step
            widest = max(c, self.n_inner)
            self._qwork = torch.empty(rows_held * (widest + QBLOCK + 8 * (widest // QBLOCK + 2)) + 256,
                                      dtype=torch.uint8)
        scratch = plan.threads * heads_per_item * plan.max_seq_len
        if self._scratch.numel() < scratch:
            self._scratch = torch.empty(max(scratch, 2 * self._scratch.numel()))
        slots = slots.to(torch.int64).contiguous()
        out = torch.empty(rows, c)
        ln_f = self._keep.ln_f
        with _named("native::gpt2_decode_step"):
            self._lib.gpt2_decode_step(
                ctypes.addressof(self._specs), len(self._specs), _ptr(ln_f[0]), _ptr(ln_f[1]), self.eps,
                h.data_ptr(), out.data_ptr(), rows, c, self.n_head, self.n_inner, slots.data_ptr(),
                plan.block_tables.data_ptr(), plan.block_tables.stride(0), plan.seq_lens.data_ptr(),
                self.block_size, heads_per_item, plan.max_seq_len, self._work.data_ptr(), self._qwork.data_ptr(),
                self._scratch.data_ptr(), plan.threads)
        return out
