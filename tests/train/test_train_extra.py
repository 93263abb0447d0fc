"""`lmservice train` after the quick-start install (no `train` extra): one line naming the install command,
exit 2, instead of a traceback from the first job module that imports matplotlib or datasets."""

from __future__ import annotations

import subprocess
import sys

from tests.servers import ROOT

# The process starts with the module unimportable, as after `pip install -e .`; `None` in sys.modules makes
# both `import matplotlib` and importlib.util.find_spec("matplotlib") fail as if it were not installed.
RUN_CLI = "import sys; {block}from lmservice.cli import main; sys.exit(main(sys.argv[1:]))"


def run_train(*argv: str, block: str | None) -> subprocess.CompletedProcess:
    code = RUN_CLI.format(block=f"sys.modules[{block!r}] = None; " if block else "")
    return subprocess.run([sys.executable, "-c", code, "train", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_without_the_extra_one_line_names_the_install_command():
    for argv in (["--help"], ["pretrain", "--help"]):
        out = run_train(*argv, block="matplotlib")
        assert out.returncode == 2, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1, out.stderr
        assert "missing: matplotlib" in lines[0]
        assert "pip install 'lmservice[train]'" in lines[0] and "pip install -e '.[train]'" in lines[0]
        assert out.stdout == ""


def test_with_the_extra_help_works():
    # Negative control: the same process without the block prints the jobs' help and exits 0.
    out = run_train("--help", block=None)
    assert out.returncode == 0, out.stderr
    assert "pretrain" in out.stdout and "train extra" not in out.stderr
