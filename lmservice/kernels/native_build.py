"""Building the native CPU kernels (csrc/cpu_kernels.c): one library per x86-64 level the C code has paths for.

The package's build (setup.py, on `pip install` and on a wheel build) calls `build_variants` into
lmservice/kernels/_native/; at load lmservice/kernels/cpu_native.py takes the best variant the CPU runs. The
variants are the levels at which the C code changes: `x86-64-v4-vnni` (AVX-512 and the int8 x int8 VNNI
kernel), `x86-64-v4` (AVX-512, with the AVX2 int8 kernel), `x86-64-v3` (AVX2 + FMA, and the int8 kernel on
vpmaddubsw) and `x86-64` (portable C, what the compiler vectorizes with SSE2; no int8 kernel). x86-64-v2 would compile to the same code as x86-64: no variant of its own.
Off x86-64 there is one variant, `generic`, for the compiler's default target.

Each library is named by a digest of the sources (`cpu_kernels-<digest>-<variant>.so`), so a library built
from other sources is never picked up. `python -m lmservice.kernels [DIR]` rebuilds them
(after editing the C sources in a checkout).

NOTE: standard library only, and nothing from lmservice: setup.py loads this file by path before the
package's dependencies (torch) are installed.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCE = CSRC / "cpu_kernels.c"
HEADER = CSRC / "cpu_kernels.h"
PACKAGE_DIR = Path(__file__).resolve().parent / "_native"  # where the package's build writes the variants
CFLAGS = ("-O3", "-ffast-math", "-fopenmp", "-fPIC")
# NOTE: linked in a second step without -ffast-math: a shared object linked with it (gcc < 13) gets
# crtfastmath.o, whose constructor turns on flush-to-zero / denormals-are-zero for the whole process.
LDFLAGS = ("-shared", "-fopenmp")
LIBS = ("-lm",)  # libm's linker script brings libmvec: the vector expf -ffast-math calls


class Variant(NamedTuple):
    name: str
    march: tuple[str, ...]  # the target flags of this build
    needs: frozenset[str]  # the /proc/cpuinfo flags a CPU must have to run it


_V3 = frozenset({"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"})
_V4 = _V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
X86_VARIANTS = (  # best first
    Variant("x86-64-v4-vnni", ("-march=x86-64-v4", "-mavx512vnni", "-mtune=generic"), _V4 | {"avx512_vnni"}),
    Variant("x86-64-v4", ("-march=x86-64-v4", "-mtune=generic"), _V4),
    Variant("x86-64-v3", ("-march=x86-64-v3", "-mtune=generic"), _V3),
    Variant("x86-64", ("-march=x86-64", "-mtune=generic"), frozenset()),
)
GENERIC = (Variant("generic", (), frozenset()),)


def variants(machine: str | None = None) -> tuple[Variant, ...]:
    """The variants built for `machine` (this one's by default), best first."""
    machine = (machine or platform.machine()).lower()
    return X86_VARIANTS if machine in ("x86_64", "amd64") else GENERIC


def best_variant(flags: frozenset[str], machine: str | None = None) -> Variant:
    """The best variant a CPU with these flags runs (the last one needs nothing)."""
    return next(v for v in variants(machine) if v.needs <= flags)


def source_digest(source: Path = SOURCE) -> str:
    """Of the C source and every header beside it: what a library's name promises it was built from."""
    digest = hashlib.sha256(source.read_bytes())
    for header in sorted(source.parent.glob("*.h")):
        digest.update(header.read_bytes())
    return digest.hexdigest()[:16]


def library_name(variant: str, source: Path = SOURCE) -> str:
    return f"{source.stem}-{source_digest(source)}-{variant}.so"


def find_compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def compile_library(target: Path, target_flags: tuple[str, ...], compiler: str | None = None,
                    source: Path = SOURCE, cflags: tuple[str, ...] = CFLAGS) -> Path:
    """Compile `source` for `target_flags` and link it into `target` (written atomically); returns target.
    Raises OSError (no compiler) or subprocess.CalledProcessError (its stderr says why)."""
    compiler = compiler or find_compiler()
    if compiler is None:
        raise FileNotFoundError("no C compiler (cc, gcc or $CC)")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    obj = tmp + ".o"
    try:
        compile_ = [compiler, *cflags, *target_flags, "-c", str(source), "-o", obj]
        link = [compiler, *LDFLAGS, obj, "-o", tmp, *LIBS]
        for command in (compile_, link):
            subprocess.run(command, capture_output=True, text=True, check=True, timeout=300)
        os.chmod(tmp, 0o755)  # mkstemp's 0600 would keep other users (an image's non-root user) from loading it
        os.replace(tmp, target)  # atomic: a concurrent build of the same name writes the same bytes
    finally:
        for path in (tmp, obj):
            if os.path.exists(path):
                os.unlink(path)
    return target


def build_variants(directory: Path = PACKAGE_DIR, compiler: str | None = None,
                   machine: str | None = None) -> list[Path]:
    """Every variant for `machine` into `directory`, replacing libraries built from other sources there."""
    directory = Path(directory)
    for old in directory.glob(f"{SOURCE.stem}-*.so"):
        old.unlink()
    return [compile_library(directory / library_name(v.name), v.march, compiler) for v in variants(machine)]


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    directory = Path(args[0]) if args else PACKAGE_DIR
    try:
        built = build_variants(directory)
    except (OSError, subprocess.CalledProcessError) as exc:
        sys.exit(f"building the native CPU kernels failed: {getattr(exc, 'stderr', None) or exc}")
    for path in built:
        print(path)


if __name__ == "__main__":
    main()
