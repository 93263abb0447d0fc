"""deploy/README.md's procedure for publishing a fine-tuned adapter into running replicas, run as written
(the Python that the README runs in each pod) against a real server."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import httpx

from tests.deploy.deploy_support import DEPLOY

# The program inside `kubectl exec "$pod" -- python -c '...' NAME`.
_SNIPPET = re.compile(r"python -c '\n(?P<code>.*?)' (?P<name>[\w-]+)\n", re.DOTALL)


def test_readme_publish_snippet_loads_an_adapter(server, model_dirs) -> None:
    from tests.servers import ADMIN_KEY, API_KEY

    match = _SNIPPET.search((DEPLOY / "README.md").read_text())
    assert match, "deploy/README.md has no publish snippet"
    name = "published-by-readme"
    # What a fine-tuning job leaves in the adapters dir: a PEFT adapter directory with its card.
    shutil.copytree(model_dirs["adapters"] / "tr", model_dirs["adapters"] / name)
    try:
        env = {**os.environ, "LMSERVICE_PORT": str(server.port), "LMSERVICE_ADMIN_KEY": ADMIN_KEY}
        result = subprocess.run([sys.executable, "-c", match["code"], name], env=env, capture_output=True,
                                text=True, timeout=60, check=False)
        assert result.returncode == 0 and result.stdout.split() == [name, "201"], result.stdout + result.stderr
        models = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"},
                           timeout=30).json()
        assert name in {m["id"] for m in models["data"]}
    finally:  # the models and the server are shared by the whole session (tests/conftest.py): leave them as found
        httpx.delete(server.url + f"/v1/adapters/{name}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
        shutil.rmtree(model_dirs["adapters"] / name, ignore_errors=True)
