"""Where adapters may be loaded from: names the API accepts, directories inside the adapters dir.

The start-up scan and POST /v1/adapters apply the same rules: a name is 1-64 of [A-Za-z0-9._-]
starting with a letter or digit, a requested path is at most `max_path_chars` long, and a directory
(after resolving symlinks) lies inside the adapters dir; the files inside it are confined in turn by
the adapter reader (lmservice/model/lora.py). A message never repeats more than a few dozen characters
of what the caller sent. Torch-free: path resolution runs on whatever thread calls it (the registry
calls it off the event loop, since resolving walks the file system).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from lmservice.config import Settings

ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # used with fullmatch: no trailing newline
DEFAULT_MAX_ADAPTER_PATH_CHARS: int = Settings.model_fields["max_adapter_path_chars"].default


class AdapterPathError(ValueError):
    """An adapter name or directory the server refuses (outside the adapters dir, bad name): HTTP 400, the
    request's mistake."""


class AdapterLinkError(ValueError):
    """A requested directory inside the adapters dir that is a symlink leading out of it: HTTP 400, and a
    failed load of the adapter's files (what is in the adapters dir is at fault, not the request)."""


def shown(text: str, limit: int = 64) -> str:
    """repr() of caller-supplied text, cut to `limit` characters (the length is said when it is cut)."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def check_adapter_name(name: str) -> None:
    if not ADAPTER_NAME.fullmatch(name):
        raise AdapterPathError(f"adapter name {shown(name)} must be 1-64 of [A-Za-z0-9._-], starting with a letter or digit")


def check_adapter_path(directory: str, max_path_chars: int) -> None:
    """The cheap checks of a requested directory, before the file system is touched."""
    if len(directory) > max_path_chars:
        raise AdapterPathError(f"adapter path is {len(directory)} characters, over the limit of {max_path_chars}")
    if "\0" in directory:
        raise AdapterPathError("adapter path holds a NUL character")


def resolve_adapter_dir(adapters_dir: Path | None, directory: str) -> Path:
    """`directory` inside `adapters_dir`: AdapterPathError when it leads out as written (`..`, an absolute
    path) or loops, AdapterLinkError when a symlink leads it out. Walks the file system: call it off the
    event loop."""
    if adapters_dir is None:
        raise AdapterPathError("this server has no adapters dir (--adapters-dir): it cannot load adapters")
    root = Path(adapters_dir).resolve()
    written = Path(os.path.normpath(root / directory))  # `..` taken as written, symlinks not followed
    if written == root or root not in written.parents:
        raise AdapterPathError(f"adapter directory {shown(directory)} is outside the adapters dir")
    try:
        path = written.resolve()
    except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13)
        raise AdapterPathError(f"adapter directory {shown(directory)} cannot be resolved (a symlink loop)") from None
    if path == root or root not in path.parents:
        raise AdapterLinkError(f"adapter directory {shown(directory)} is a link leading outside the adapters dir")
    return path


def find_adapters(directory: Path) -> tuple[dict[str, Path], dict[Path, str]]:
    """Every PEFT adapter directory (one holding adapter_config.json) directly under `directory`, named
    as the adapter name rule allows, and the refused ones with the reason (a symlink that leads outside
    the directory, a name the API would refuse): the scan trusts no more than POST /v1/adapters does."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterPathError(f"adapters dir {directory} does not exist")
    root = directory.resolve()
    found: dict[str, Path] = {}
    refused: dict[Path, str] = {}
    for path in sorted(directory.iterdir()):
        if not (path / "adapter_config.json").is_file():
            continue
        real = path.resolve()
        if real == root or root not in real.parents:
            refused[path] = "it leads outside the adapters dir"
        elif not ADAPTER_NAME.fullmatch(path.name):
            refused[path] = "not a valid adapter name (1-64 of [A-Za-z0-9._-], starting with a letter or digit)"
        else:
            found[path.name] = path
    return found, refused
