"""The API tests' real server (`lmservice serve` in a subprocess over a tiny random-weight GPT-2), reused as it
is: the dashboard check compares its queries with what that server's /metrics really exports."""

from tests.api.conftest import model_dirs, server  # noqa: F401  (pytest fixtures, imported to be reused)
