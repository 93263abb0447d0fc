"""Suite-wide set-up that must happen before any test module is imported, and the fixtures every test
package shares.

NOTE: Triton picks interpreter or compiler when a kernel module is decorated, and
transformers / peft import triton as they load. Without a GPU the kernels can only
run in the interpreter, so TRITON_INTERPRET is set here, first.
"""

import os

if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402  (after TRITON_INTERPRET)

import pytest  # noqa: E402
import torch  # noqa: E402

from lmservice.engine.engine import Engine, EngineConfig  # noqa: E402
from lmservice.model.loader import load_model  # noqa: E402
from tests.helpers import make_gpt2_dir  # noqa: E402
from tests.servers import ADMIN_KEY, API_KEY, make_adapter, start_server  # noqa: E402

# ---- the random-weight models and the shared server of tests/api, tests/deploy and tests/web


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("api_models")
    base = make_gpt2_dir(root / "base", seed=3, vocab_size=1000, n_positions=1024, n_embd=64, n_layer=2, n_head=4)
    adapters = root / "adapters"
    make_adapter(base, adapters / "cls", classifier=True, seed=1)
    make_adapter(base, adapters / "tr", classifier=False, seed=2)
    return {"base": base, "adapters": adapters}


@pytest.fixture(scope="session")
def slow_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """A wider model (several ms per decode step) for tests that need a request to outlive a few HTTP calls,
    with the same two adapters as the small one."""
    root = tmp_path_factory.mktemp("api_slow_model")
    base = make_gpt2_dir(root / "base", seed=5, vocab_size=1000, n_positions=1024, n_embd=384, n_layer=6, n_head=6)
    make_adapter(base, root / "adapters" / "cls", classifier=True, seed=1)
    make_adapter(base, root / "adapters" / "tr", classifier=False, seed=2)
    return {"base": base, "adapters": root / "adapters"}


@pytest.fixture(scope="session")
def server(model_dirs, tmp_path_factory):
    """The shared server: API keys on, an admin key, default queue bounds."""
    srv = start_server(model_dirs, tmp_path_factory, "main", "--api-key", API_KEY, "--api-key", "second-key",
                       "--admin-key", ADMIN_KEY, "--max-body-bytes", "65536")
    yield srv
    srv.stop()


# ---- a tiny random-weight model and synchronous engines on it (tests/engine, tests/serving, ...)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_gpt2_dir(tmp_path_factory.mktemp("tiny") / "model", seed=1)


@pytest.fixture
def tiny_engine(tiny_model_dir):
    def build(**kwargs) -> Engine:
        kwargs.setdefault("num_kv_blocks", 128)
        return Engine(load_model(tiny_model_dir, device="cpu", dtype="float32"), EngineConfig.from_fields(**kwargs))

    torch.manual_seed(0)
    return build
