"""The package's build: setuptools as pyproject.toml configures it, plus the native CPU kernels.

build_py also compiles lmservice/kernels/csrc into one library per x86-64 level
(lmservice/kernels/native_build.py) inside the package, lmservice/kernels/_native/: into the build tree for a
wheel or a regular install, into the source tree for an editable one (`pip install -e .`). A failed build
(no C compiler) is a warning, not an error: the package installs and serves on torch ops, and says so at
start-up.
"""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

ROOT = Path(__file__).resolve().parent


def _native_build():
    """lmservice/kernels/native_build.py by path: importing the package would import torch."""
    spec = importlib.util.spec_from_file_location("lmservice_native_build", ROOT / "lmservice/kernels/native_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildWithKernels(build_py):
    def run(self) -> None:
        super().run()
        native_build = _native_build()
        package_dir = Path("lmservice/kernels/_native")
        target = ROOT / package_dir if self.editable_mode else Path(self.build_lib) / package_dir
        try:
            for path in native_build.build_variants(target):
                print(f"built the native CPU kernels {path.name}")
        except (OSError, subprocess.CalledProcessError) as exc:
            self.warn(f"the native CPU kernels were not built ({getattr(exc, 'stderr', None) or exc}); "
                      "lmservice will serve on torch ops")


class PlatformDistribution(Distribution):
    """The package holds libraries for one platform: installed as platform files, not pure Python."""

    def has_ext_modules(self) -> bool:
        return True


class PlatformWheel(bdist_wheel):
    """Tagged py3-none-<platform>: the libraries are loaded with ctypes, not as extensions of one Python."""

    def get_tag(self) -> tuple[str, str, str]:
        return "py3", "none", super().get_tag()[2]


setup(cmdclass={"build_py": BuildWithKernels, "bdist_wheel": PlatformWheel}, distclass=PlatformDistribution)
