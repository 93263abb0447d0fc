"""lmservice/kernels/native_build.py and the loader of lmservice/kernels/cpu_native.py: the variant a CPU gets, the
ABI check against csrc/cpu_kernels.h, the cap of LMSERVICE_CPU_ISA, and the policy chosen from what loads."""

from __future__ import annotations

import logging
import re
import shutil

import pytest
import torch

import lmservice.kernels.cpu_native as native
from lmservice.kernels import TORCH_CPU_KERNELS, TORCH_OPS, choose_kernels
from lmservice.kernels import native_build as build
from lmservice.kernels.cpuinfo import ISA_ENV, ISA_LEVELS, cpu_flags
from lmservice.model import cpu

CPU = torch.device("cpu")
X86 = build.variants() == build.X86_VARIANTS
V3 = frozenset({"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave", "sse4_2"})
AVX512 = V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


@pytest.fixture
def fresh_loader(monkeypatch):
    """native_library() looks again (and the state it had comes back after the test)."""
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_tried", False)
    return monkeypatch


def test_the_header_and_the_ctypes_declarations_name_one_abi_version():
    define = re.search(r"#define LMSERVICE_KERNELS_ABI_VERSION (\d+)", build.HEADER.read_text())
    assert define and int(define.group(1)) == native.ABI_VERSION


_V = native.ABI_VERSION


@pytest.mark.parametrize(("edit", "refusal"), [
    (lambda h: h.replace(f"#define LMSERVICE_KERNELS_ABI_VERSION {_V}", f"#define LMSERVICE_KERNELS_ABI_VERSION {_V + 1}"),
     f"ABI version {_V + 1}, this lmservice declares {_V}"),
    (lambda h: h.replace("\n} native_linear;", "\n    int64_t extra;\n} native_linear;"), "struct layout"),
], ids=["version", "struct"])
def test_a_library_built_from_another_header_is_refused(tmp_path, edit, refusal):
    if build.find_compiler() is None:
        pytest.skip("no C compiler to build a library with")
    csrc = tmp_path / "csrc"
    shutil.copytree(build.CSRC, csrc)
    header = csrc / "cpu_kernels.h"
    changed = edit(header.read_text())
    assert changed != header.read_text()  # the edit took (else the test proves nothing)
    header.write_text(changed)
    path = build.compile_library(tmp_path / "other.so", build.variants()[-1].march, source=csrc / "cpu_kernels.c",
                                 cflags=("-O0", "-fopenmp", "-fPIC"))
    with pytest.raises(native.NativeLibraryError, match=refusal):
        native.load_library(path, "other")
    unchanged = build.compile_library(tmp_path / "same.so", build.variants()[-1].march,  # the negative control
                                      cflags=("-O0", "-fopenmp", "-fPIC"))
    assert native.load_library(unchanged, "same").variant == "same"


@pytest.mark.skipif(not X86, reason="the x86-64 variants")
def test_each_cpu_gets_the_best_variant_it_runs():
    assert build.best_variant(AVX512 | {"avx512_vnni", "amx_tile"}).name == "x86-64-v4-vnni"
    assert build.best_variant(AVX512).name == "x86-64-v4"  # AVX-512 without VNNI: the AVX2 int8 kernel
    assert build.best_variant(V3).name == "x86-64-v3"
    assert build.best_variant(V3 - {"fma"}).name == "x86-64"
    assert build.best_variant(frozenset()).name == "x86-64"


def test_the_isa_cap_hides_what_is_past_it(monkeypatch):
    monkeypatch.setenv(ISA_ENV, "x86-64-v3")
    flags = cpu_flags()
    assert not any(f.startswith(("avx512", "amx")) or "vnni" in f for f in flags)
    assert cpu.cpu_flags() == flags and not cpu.has_bf16_matmul()  # the model's choices see the same flags
    monkeypatch.setenv(ISA_ENV, "x86-64-v4")
    assert not any("vnni" in f or f.startswith("amx") for f in cpu_flags())
    monkeypatch.setenv(ISA_ENV, "pentium")
    with pytest.raises(ValueError, match="LMSERVICE_CPU_ISA='pentium' is not one of x86-64, x86-64-v2"):
        cpu_flags()
    monkeypatch.delenv(ISA_ENV)
    assert cpu_flags() >= flags


@pytest.mark.skipif(not X86 or not any(build.PACKAGE_DIR.glob("*.so")), reason="no variants built in the package")
@pytest.mark.parametrize("cap", ISA_LEVELS)
def test_the_loader_never_takes_a_variant_the_capped_cpu_lacks(fresh_loader, cap, gen):
    """Each cap this CPU can honour loads the best variant under it, and that variant computes the same."""
    fresh_loader.setenv(ISA_ENV, cap)
    want = build.best_variant(cpu_flags())
    if not (build.PACKAGE_DIR / build.library_name(want.name)).is_file():
        pytest.skip(f"{want.name} was not built here")
    lib = native.native_library()
    assert lib is not None and lib.variant == want.name and want.needs <= cpu_flags()
    assert lib.int8_kernel == {"x86-64-v4-vnni": "vnni", "x86-64-v4": "avx2", "x86-64-v3": "avx2"}.get(want.name)
    weight, bias, x = torch.randn(300, 100, generator=gen), torch.randn(300, generator=gen), torch.randn(7, 100, generator=gen)
    torch.testing.assert_close(lib.linear_f32(x, weight, bias), torch.nn.functional.linear(x, weight, bias),
                               atol=1e-4, rtol=1e-5)


def test_libraries_of_other_sources_are_not_loaded(fresh_loader, tmp_path, caplog):
    """A library named for another digest of the sources is never picked up: torch ops, and one warning."""
    (tmp_path / f"{build.SOURCE.stem}-0000000000000000-{build.variants()[-1].name}.so").write_bytes(b"")
    fresh_loader.setenv("LMSERVICE_PREBUILT_KERNELS", str(tmp_path))
    fresh_loader.delenv("LMSERVICE_NATIVE_BUILD", raising=False)
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert native.native_library() is None
        assert native.native_library() is None
    assert len(caplog.records) == 1 and "built from other sources" in caplog.text
    ops, policy = choose_kernels("auto", "auto", CPU, torch.float32)
    assert ops is TORCH_OPS and policy is TORCH_CPU_KERNELS
    assert policy.describe()["variant"] == "torch"
    with pytest.raises(RuntimeError, match="cpu_kernels native: no native CPU kernels"):
        choose_kernels("auto", "native", CPU, torch.float32)


def test_the_developer_build_compiles_for_this_cpu(fresh_loader, tmp_path):
    """LMSERVICE_NATIVE_BUILD=1: -march=native into the cache, once; without a compiler, the prebuilt ones."""
    if build.find_compiler() is None:
        pytest.skip("no C compiler")
    fresh_loader.setenv("LMSERVICE_NATIVE_BUILD", "1")
    fresh_loader.setenv("LMSERVICE_KERNEL_CACHE", str(tmp_path))
    fresh_loader.delenv(ISA_ENV, raising=False)
    lib = native.native_library()
    assert lib is not None and lib.variant == native.DEVELOPER_BUILD and lib.path.parent == tmp_path
    fresh_loader.setattr(native, "_tried", False)
    fresh_loader.setenv("CC", str(tmp_path / "no-such-compiler"))
    fresh_loader.setenv("LMSERVICE_KERNEL_CACHE", str(tmp_path / "empty"))
    lib = native.native_library()
    assert lib is None or lib.variant != native.DEVELOPER_BUILD


def test_the_policy_follows_the_settings_and_the_model():
    """auto runs C on float32 and bfloat16 CPU models where a library loads; torch (or attention_backend torch) runs none;
    native on a model it cannot run, or against another setting, fails at start-up."""
    lib = native.native_library()
    ops, policy = choose_kernels("auto", "auto", CPU, torch.float32)
    if lib is None:
        assert ops is TORCH_OPS and policy is TORCH_CPU_KERNELS
    else:
        assert ops.name == "native" and ops.decode_attention == lib.decode_attention and policy.library is lib
        assert policy.describe()["variant"] == lib.variant and policy.decode_step_rows > 0
        assert (policy.linear_int8_rows > 0) == (lib.int8_kernel == "vnni")
        assert (policy.decode_step_int8_rows > 0) == lib.has_int8
    for attention, kernels in (("torch", "auto"), ("auto", "torch"), ("torch", "torch")):
        assert choose_kernels(attention, kernels, CPU, torch.float32) == (TORCH_OPS, TORCH_CPU_KERNELS)
    # bf16: C in decode steps, the decode attention and the LM head (tests/engine/test_native_bf16.py); fp16: none
    ops, policy = choose_kernels("auto", "auto", CPU, torch.bfloat16)
    assert policy.library is lib and (lib is None or (policy.decode_step_rows > 0 and ops.name == "native"))
    assert choose_kernels("auto", "auto", CPU, torch.float16) == (TORCH_OPS, TORCH_CPU_KERNELS)
    with pytest.raises(ValueError, match=r"kernels \(cpu_kernels native\) run float32 and bfloat16 models on CPUs, "
                                         r"not torch.float16"):
        choose_kernels("native", "auto", CPU, torch.float16)
    with pytest.raises(ValueError, match="attention_backend native contradicts cpu_kernels torch"):
        choose_kernels("native", "torch", CPU, torch.float32)
    with pytest.raises(ValueError, match="cpu_kernels 'fast' is not one of auto, native, torch"):
        choose_kernels("auto", "fast", CPU, torch.float32)


def test_the_package_holds_libraries_of_these_sources():
    """Libraries built from other sources are never loaded, so after an edit of csrc/ without a rebuild the
    native tests would skip and the engine would serve on torch ops: here that is a failure, not a skip."""
    built = sorted(build.PACKAGE_DIR.glob(f"{build.SOURCE.stem}-*.so"))
    if build.find_compiler() is None or not built:
        pytest.skip("no libraries were built into the package (no C compiler at install time)")
    stale = [p.name for p in built if not p.name.startswith(f"{build.SOURCE.stem}-{build.source_digest()}-")]
    assert not stale, f"built from other sources: {stale}; rebuild them with `python -m lmservice.kernels`"
