"""Where adapters may be loaded from: names the API accepts, directories inside the adapters dir.

The start-up scan and POST /v1/adapters apply the same rules: a name is 1-64 of [A-Za-z0-9._-]
starting with a letter or digit, and a directory (after resolving symlinks) lies inside the
adapters dir. Torch-free.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

log = logging.getLogger("lmservice.serving")

ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # used with fullmatch: no trailing newline


class AdapterPathError(ValueError):
    """An adapter name or directory the server refuses (outside the adapters dir, bad name): HTTP 400."""


def check_adapter_name(name: str) -> None:
    if not ADAPTER_NAME.fullmatch(name):
        raise AdapterPathError(f"adapter name {name!r} must be 1-64 of [A-Za-z0-9._-], starting with a letter or digit")


def resolve_adapter_dir(adapters_dir: Path | None, name: str, directory: str) -> Path:
    """`directory` inside `adapters_dir`, or AdapterPathError (no path traversal, no absolute escape)."""
    check_adapter_name(name)
    if adapters_dir is None:
        raise AdapterPathError("this server has no adapters dir (--adapters-dir): it cannot load adapters")
    root = Path(adapters_dir).resolve()
    path = (root / directory).resolve()
    if path == root or root not in path.parents:
        raise AdapterPathError(f"adapter directory {directory!r} is outside the adapters dir")
    return path


def find_adapters(directory: Path) -> dict[str, Path]:
    """Every PEFT adapter directory (one holding adapter_config.json) directly under `directory`, named
    as the adapter name rule allows. A symlink that leads outside the directory is skipped with a
    warning: the scan trusts no more than POST /v1/adapters does."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterPathError(f"adapters dir {directory} does not exist")
    root = directory.resolve()
    found = {}
    for path in sorted(directory.iterdir()):
        if not (path / "adapter_config.json").is_file():
            continue
        real = path.resolve()
        if real == root or root not in real.parents:
            log.warning("skipping adapter %s: it leads outside the adapters dir (to %s)", path.name, real)
        elif not ADAPTER_NAME.fullmatch(path.name):
            log.warning("skipping adapter directory %r: not a valid adapter name", path.name)
        else:
            found[path.name] = path
    return found
