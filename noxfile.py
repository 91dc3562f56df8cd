"""Test sessions for difftrain. Each session gets its own virtualenv, installs the package
with its extras, exports the determinism variables, and tees its output to `_ci_tmp/`.

    nox -s unit                      # CPU, offline (the default session)
    nox -s integration               # CPU slow/integration tests (the runbook's scripts)
    nox -s distributed               # several training processes (gloo on the CPU)
    nox -s gpu_smoke                 # 2-step training on a GPU; fills the checklist
    nox -s matrix                    # torch x CUDA build cells (see TORCH_MATRIX)
    nox -s lint
    nox -s report                    # fill the smoke checklist from _ci_tmp/
    nox -s unit -- -k config -x      # anything after -- goes to pytest

torch is installed first, through pip, from settings you can change without editing this file:
    DIFFTRAIN_TORCH_VERSION   torch version for unit/integration/gpu_smoke (default 2.13.0)
    DIFFTRAIN_TORCH_INDEX     where torch comes from: "pypi" (pip's configured index; the
                              default), "pytorch" (PyTorch's index for each matrix cell's
                              build, e.g. .../whl/cu128) or a URL
    DIFFTRAIN_TORCH_MATRIX    matrix cells, "VERSION=BUILD,..." (default below); BUILD is cpu
                              or cuXYZ
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import nox

nox.options.default_venv_backend = "virtualenv"
nox.options.sessions = ["unit"]
nox.options.error_on_missing_interpreters = True

ROOT = Path(__file__).resolve().parent
CI_DIR = ROOT / "_ci_tmp"
LOG_DIR = CI_DIR / "logs"
JUNIT_DIR = CI_DIR / "junit"
PYTEST_TMP = CI_DIR / "pytest_tmp"

TORCH_VERSION = os.environ.get("DIFFTRAIN_TORCH_VERSION", "2.13.0")
TORCH_MATRIX = os.environ.get("DIFFTRAIN_TORCH_MATRIX", "2.13.0=cpu,2.14.1=cu130")
PYTORCH_INDEX = "https://download.pytorch.org/whl/{build}"
RUFF_VERSION = "0.17.6"

DETERMINISM_ENV = {
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
    "PYTHONHASHSEED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
UNIT_MARKERS = "not slow and not integration"
SMOKE_MARKERS = "slow and cuda and text2image"


# --- shared helpers -------------------------------------------------------------------------


def torch_index_url(build: str | None = None) -> str | None:
    choice = os.environ.get("DIFFTRAIN_TORCH_INDEX", "pypi")
    if choice == "pypi":
        return None
    if choice == "pytorch":
        return PYTORCH_INDEX.format(build=build or "cpu")
    return choice


def install(session: nox.Session, torch_version: str, index_url: str | None) -> None:
    """torch first (exact version, chosen index), then the package with its extras.

    Installing torch on its own keeps pip from picking a torch build for us: the package asks
    for a range, which the torch installed here already satisfies.
    """
    session.install("--upgrade", "pip")
    torch_args = [f"torch=={torch_version}"]
    if index_url:
        torch_args += ["--index-url", index_url]
    session.install(*torch_args)
    session.install("-e", f"{ROOT}[text2image,dev]")


def log_name(session: nox.Session) -> str:
    return re.sub(r"[^\w.-]+", "-", session.name).strip("-")


def run_pytest(
    session: nox.Session,
    markers: str,
    *options: str,
    offline: bool = True,
    extra_logs: tuple[str, ...] = (),
) -> None:
    """pytest with markers, JUnit XML and a private basetemp; output teed to _ci_tmp/logs/."""
    name = log_name(session)
    for folder in (LOG_DIR, JUNIT_DIR, PYTEST_TMP):
        folder.mkdir(parents=True, exist_ok=True)
    env = {**DETERMINISM_ENV, **(OFFLINE_ENV if offline else {})}
    session.env.update(env)
    pytest_args = [
        "python",
        "-m",
        "pytest",
        str(ROOT / "tests"),
        "-m",
        markers,
        *options,
        f"--junitxml={JUNIT_DIR / f'{name}.xml'}",
        f"--basetemp={PYTEST_TMP / name}",  # pytest empties its basetemp before each run
        *session.posargs,
    ]
    logs = [LOG_DIR / f"{name}.log", *(LOG_DIR / extra for extra in extra_logs)]
    session.log("exported: " + " ".join(f"{k}={v}" for k, v in env.items()))
    # `tee` streams to the console and the log files; pipefail keeps pytest's exit status.
    command = f"set -o pipefail; {shlex.join(pytest_args)} 2>&1 | tee {shlex.join(map(str, logs))}"
    session.run("bash", "-c", command, external=True)


def nvidia_smi(*args: str) -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        return subprocess.run(
            ["nvidia-smi", *args], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def save_gpu_facts() -> str | None:
    """Write nvidia-smi's report and a CSV query to _ci_tmp/logs/; return the report."""
    report = nvidia_smi()
    if report is None:
        return None
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    (LOG_DIR / "nvidia-smi.txt").write_text(report)
    query = nvidia_smi("--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv")
    (LOG_DIR / "nvidia-smi.csv").write_text(query or "")
    return report


def driver_cuda_version(report: str | None) -> tuple[int, int] | None:
    match = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", report or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def build_cuda_version(build: str) -> tuple[int, int] | None:
    """cu128 -> (12, 8), cu130 -> (13, 0); cpu -> None."""
    match = re.fullmatch(r"cu(\d+)(\d)", build)
    return (int(match.group(1)), int(match.group(2))) if match else None


def torch_facts(session: nox.Session) -> tuple[str, str | None, bool]:
    out = session.run(
        "python",
        "-c",
        "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())",
        silent=True,
    )
    version, cuda, available = out.strip().splitlines()[-1].split()
    return version, None if cuda == "None" else cuda, available == "True"


def render_checklist(session: nox.Session) -> None:
    session.run("difftrain", "report", "--ci-dir", str(CI_DIR))


# --- sessions -------------------------------------------------------------------------------


@nox.session
def unit(session: nox.Session) -> None:
    """CPU unit tests, offline, in parallel (pytest-xdist)."""
    install(session, TORCH_VERSION, torch_index_url())
    run_pytest(session, UNIT_MARKERS, "-n", "auto", "-v")


@nox.session
def integration(session: nox.Session) -> None:
    """CPU slow and integration tests: the runbook's debug path, fault tests."""
    install(session, TORCH_VERSION, torch_index_url())
    run_pytest(
        session,
        "(slow or integration) and not cuda and not distributed",
        "--run-slow",
        "--run-integration",
        "-v",
    )


@nox.session
def distributed(session: nox.Session) -> None:
    """Multi-process training on the CPU (gloo): world-size invariance, resume on another
    number of processes, signals, a dead process, two nodes on localhost."""
    install(session, TORCH_VERSION, torch_index_url())
    run_pytest(session, "distributed", "--run-slow", "--run-integration", "-v")


@nox.session
def gpu_smoke(session: nox.Session) -> None:
    """2-step training on the GPU (hub model and builtin model); then fill the checklist."""
    report = save_gpu_facts()
    if report is None:
        session.skip("no NVIDIA GPU here: nvidia-smi is missing or failed")
    install(session, TORCH_VERSION, torch_index_url())
    version, cuda, available = torch_facts(session)
    if not available:
        session.error(
            f"a GPU is present (see {LOG_DIR / 'nvidia-smi.txt'}) but torch {version} "
            f"(CUDA build {cuda}) cannot use it; install a torch build for this driver "
            "(DIFFTRAIN_TORCH_INDEX=pytorch with a matching DIFFTRAIN_TORCH_VERSION)"
        )
    try:
        run_pytest(
            session,
            SMOKE_MARKERS,
            "--run-slow",
            "--run-integration",
            "-v",
            offline=False,
            extra_logs=("text2image_smoke.log",),
        )
    finally:
        render_checklist(session)


def matrix_cells() -> list:
    cells = []
    for item in filter(None, (part.strip() for part in TORCH_MATRIX.split(","))):
        version, _, build = item.partition("=")
        build = build or "cpu"
        cells.append(nox.param(version, build, id=f"torch-{version}-{build}"))
    return cells


@nox.session
@nox.parametrize(("torch_version", "build"), matrix_cells())
def matrix(session: nox.Session, torch_version: str, build: str) -> None:
    """One torch version x CUDA build: unit tests, plus the GPU tests where a GPU is usable."""
    wanted_cuda = build_cuda_version(build)
    driver = driver_cuda_version(nvidia_smi())
    if wanted_cuda and driver and wanted_cuda > driver:
        session.skip(
            f"torch {torch_version}+{build} needs CUDA {wanted_cuda[0]}.{wanted_cuda[1]} but "
            f"the driver supports up to {driver[0]}.{driver[1]}"
        )
    install(session, torch_version, torch_index_url(build))
    version, cuda, available = torch_facts(session)
    if version.split("+")[0] != torch_version:
        session.error(f"asked for torch {torch_version}, got {version}")
    got_cuda = tuple(int(x) for x in cuda.split(".")[:2]) if cuda else None
    if got_cuda != wanted_cuda:
        session.error(f"asked for the {build} build of torch {torch_version}, got CUDA {cuda}")
    session.log(f"torch {version}, CUDA build {cuda}, GPU usable: {available}")
    if available:
        run_pytest(
            session,
            f"({UNIT_MARKERS}) or cuda",
            "--run-slow",
            "--run-integration",
            "-n",
            "auto",
            "-v",
            offline=False,
        )
    else:
        run_pytest(session, UNIT_MARKERS, "-n", "auto", "-v")


@nox.session
def lint(session: nox.Session) -> None:
    # Pinned: a new ruff release adds rules and changes formatting, which would fail CI on
    # code nobody touched.
    session.install(f"ruff=={RUFF_VERSION}")
    session.run("ruff", "check", "src", "tests", "scripts", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "tests", "scripts", "benchmarks", "noxfile.py")


@nox.session
def report(session: nox.Session) -> None:
    """Fill docs/mvp_smoke_checklist.md from _ci_tmp/ into _ci_tmp/reports/."""
    # The report reads files only: no torch needed, so skip the package's dependencies.
    session.install("pyyaml")
    session.install("--no-deps", "-e", str(ROOT))
    render_checklist(session)
