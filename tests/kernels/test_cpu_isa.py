"""The kernel parity tests again, as if on an AVX2-only CPU (LMSERVICE_CPU_ISA=x86-64-v3, read by
lmservice/kernels/cpuinfo.py): so that a machine with AVX-512 and VNNI also proves the AVX2 build of the C kernels,
and the int8 paths that CPU takes (the AVX2 int8 kernel, vpmaddubsw instead of VNNI, in the C step and
against its reference; FBGEMM with 7-bit activations op by op), and its 8-wide reads and writes of fp16, bf16 and
int8 KV caches. In a subprocess: the library is chosen once per
process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmservice.kernels import native_build
from lmservice.kernels.cpuinfo import ISA_ENV, cpu_flags, isa_cap

REPO = Path(__file__).resolve().parents[2]
CAP = "x86-64-v3"
PARITY_TESTS = ["tests/kernels/test_native_attention.py", "tests/kernels/test_native_blocks.py",
                "tests/kernels/test_kv_cache_dtypes.py",
                "tests/engine/test_native_decode.py::test_decode_step_matches_the_op_by_op_forward",
                "tests/engine/test_native_decode.py::test_decode_step_on_a_narrow_cache_matches_the_op_by_op_forward",
                "tests/engine/test_native_decode.py::test_cpu_kernels_torch_runs_no_c_code",
                "tests/engine/test_native_decode.py::test_not_built_for_what_it_does_not_compute",
                "tests/model/test_quantize.py::test_int8_linear_matches_its_dequantized_reference",
                "tests/model/test_quantize.py::test_block_linear_matches_its_dequantized_reference"]


def test_the_parity_tests_pass_on_the_avx2_build():
    v3 = next((v for v in native_build.variants() if v.name == CAP), None)
    if v3 is None or not v3.needs <= cpu_flags():
        pytest.skip(f"this CPU cannot run the {CAP} build")
    if isa_cap() is not None or native_build.best_variant(cpu_flags()).name == CAP:
        pytest.skip(f"the {CAP} build is what this run loads already")
    if not (native_build.PACKAGE_DIR / native_build.library_name(CAP)).is_file():
        pytest.skip(f"the {CAP} build was not made here (no C compiler at install time)")
    script = ("import lmservice.kernels.cpu_native as n; lib = n.native_library(); "
              "print(lib.variant, lib.int8_kernel)")
    env = {**os.environ, ISA_ENV: CAP}
    env.pop("LMSERVICE_NATIVE_BUILD", None)
    env.pop("LMSERVICE_PREBUILT_KERNELS", None)
    loaded = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                            check=True).stdout.split()
    assert loaded == [CAP, "avx2"]  # the AVX2 build, and with it the vpmaddubsw int8 kernel
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *PARITY_TESTS], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout
