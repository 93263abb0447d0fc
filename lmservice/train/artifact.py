"""Writing artifacts: a directory appears complete under its final name, or not at all.

Every job builds its output in a temporary sibling directory (same filesystem,
so the final `os.replace` is atomic) and renames it into place. The server,
or a second job, never sees half a model. A run's checkpoints live in a
separate work directory (`<output>.work/`) that survives kill -9 and is what
a rerun of the same command resumes from.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

CURVES_FILE = "training_curves.png"
HISTORY_FILE = "trainer_log_history.json"


def work_dir_for(output_dir: Path) -> Path:
    """Where checkpoints of the run that writes `output_dir` live (resume state)."""
    return output_dir.with_name(output_dir.name + ".work")


@contextlib.contextmanager
def atomic_directory(output_dir: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it becomes `output_dir` in one rename.

    On an exception the temporary directory is removed and `output_dir` is untouched.
    With `overwrite`, an existing `output_dir` is moved aside first and deleted after
    the new one is in place (the window without a model is one rename long).
    """
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} already exists (pass --overwrite to replace it)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        yield tmp
        _normal_permissions(tmp)
        old = None
        if output_dir.exists():
            old = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
            os.replace(output_dir, old)
        os.replace(tmp, output_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _normal_permissions(directory: Path) -> None:
    """mkdtemp makes the dir 0700 (and some writers 0600 files): give the artifact the umask's usual
    modes, so a server running as another user (a container's) can read it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for path in directory.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def save_history(directory: Path, log_history: list[dict]) -> None:
    (directory / HISTORY_FILE).write_text(json.dumps(log_history, indent=1) + "\n")


def plot_curves(directory: Path, log_history: list[dict], title: str) -> Path:
    """PNG of the training loss and every eval metric logged by the Trainer, against the step."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = directory / CURVES_FILE
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
