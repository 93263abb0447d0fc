#!/usr/bin/env bash
# Install lmservice with its test extras into .venv and run the whole suite:
# lint, layer contracts, then pytest. This is the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# constraints.txt: the exact versions CI tests (pyproject.toml states ranges).
python -m pip install -q -c constraints.txt -e '.[test]'
# Static checks of deploy/ need hadolint, promtool and kustomize: installed by this script.
[ -f scripts/install_ci_tools.sh ] && bash scripts/install_ci_tools.sh
ruff check .
lint-imports
set +e
python -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
# pytest exits 5 when it collected nothing: that is a broken suite, not a pass.
if [ "$rc" -eq 5 ]; then echo "no tests collected" >&2; exit 1; fi
exit "$rc"
