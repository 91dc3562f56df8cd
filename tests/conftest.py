"""Shared test setup: markers and their skip rules, the report header, and the fixtures
that every test layer uses (a tiny model built locally, generated data, an offline Hub cache).

Skip decisions live here only; tests just say `@pytest.mark.slow`, `@pytest.mark.cuda`, ...
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
OFFLINE_VALUES = {"1", "true", "yes", "on"}
SMOKE_HUB_MODEL = "hf-internal-testing/tiny-stable-diffusion-pipe"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="run tests marked slow")
    parser.addoption("--run-integration", action="store_true", help="run tests marked integration")


def pytest_configure(config: pytest.Config) -> None:
    # Under pytest-xdist, each worker's torch would start one thread per core: N workers on N
    # cores then fight over them and steps run 10x slower. Share the cores out instead (also
    # for the subprocesses tests start, through OMP_NUM_THREADS).
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


def pytest_report_header(config: pytest.Config) -> list[str]:
    import torch

    import difftrain

    cuda = torch.version.cuda or "none (CPU build)"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if torch.cuda.is_available():
        gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    else:
        gpus = "none"
    return [
        f"difftrain {difftrain.__version__} from {Path(difftrain.__file__).parent}",
        f"torch {torch.__version__}, CUDA {cuda}, cuDNN {cudnn}, GPU: {gpus}",
    ]


def offline_reason() -> str | None:
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in OFFLINE_VALUES:
            return f"{name}={os.environ[name]} (offline mode): this test needs the Hugging Face Hub"
    return None


@functools.cache
def hub_unreachable_reason() -> str | None:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        request = urllib.request.Request(f"{endpoint}/api/models/{SMOKE_HUB_MODEL}", method="HEAD")
        urllib.request.urlopen(request, timeout=5)
    except urllib.error.HTTPError:
        return None  # it answered: reachable
    except (OSError, ValueError) as exc:
        return f"the Hugging Face Hub ({endpoint}) is unreachable ({exc}); this test needs it"
    return None


def cuda_unavailable_reason() -> str | None:
    import torch

    if torch.cuda.is_available():
        return None
    build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return f"CUDA is not available (torch {torch.__version__}, {build})"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    option_skips = {
        "slow": ("--run-slow", config.getoption("--run-slow")),
        "integration": ("--run-integration", config.getoption("--run-integration")),
    }
    for item in items:
        for marker, (option, given) in option_skips.items():
            # get_closest_marker, not `in item.keywords`: keywords also hold folder names.
            if item.get_closest_marker(marker) and not given:
                item.add_marker(pytest.mark.skip(reason=f"marked {marker}: pass {option} to run"))
        if item.get_closest_marker("cuda") and (reason := cuda_unavailable_reason()):
            item.add_marker(pytest.mark.skip(reason=reason))
        if item.get_closest_marker("hub") and not item.get_closest_marker("skip"):
            if reason := offline_reason() or hub_unreachable_reason():
                item.add_marker(pytest.mark.skip(reason=reason))


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def builtin_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private DIFFTRAIN_CACHE for the session, so `builtin:tiny` builds here, once."""
    cache = tmp_path_factory.mktemp("difftrain-cache")
    old = os.environ.get("DIFFTRAIN_CACHE")
    os.environ["DIFFTRAIN_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("DIFFTRAIN_CACHE", None)
    else:
        os.environ["DIFFTRAIN_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_model_dir(builtin_cache: Path) -> Path:
    """The built-in tiny pipeline (random weights), built locally once per session."""
    from difftrain.models.tiny import builtin_model_path

    return builtin_model_path("builtin:tiny")


@pytest.fixture(scope="session")
def dummy_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight generated 64 px captioned images (ImageFolder layout)."""
    from difftrain.data.dummy import make_dummy_imagefolder

    return make_dummy_imagefolder(tmp_path_factory.mktemp("data") / "images", 8, 64)


@dataclass
class HubCache:
    """A fresh Hugging Face cache (HF_HOME) with offline mode on, for subprocesses.

    huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when it is imported, so code that must
    see this cache runs in a child process with `env` (see `run_python`).
    """

    hf_home: Path
    env: dict[str, str]

    def install(self, repo_id: str, folder: Path, kind: str = "models") -> Path:
        return lay_into_hub_cache(self.hf_home / "hub", repo_id, folder, kind)

    def run_python(self, code: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", code], env=self.env, cwd=cwd, capture_output=True, text=True
        )


@pytest.fixture
def hub_cache(tmp_path: Path, builtin_cache: Path) -> HubCache:
    """Lay local pipelines into a fresh Hub cache and load them by hub id, offline."""
    hf_home = tmp_path / "hf"
    env = {
        k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")
    }
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", DIFFTRAIN_CACHE=str(builtin_cache))
    return HubCache(hf_home=hf_home, env=env)


def lay_into_hub_cache(hub_dir: Path, repo_id: str, folder: Path, kind: str = "models") -> Path:
    """Copy `folder` to `hub_dir/KIND--ORG--NAME/snapshots/<hash>/` with `refs/main` (KIND:
    models or datasets)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub_dir / (f"{kind}--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
