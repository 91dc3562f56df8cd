"""The machine running `difftrain report`: what the checklist says when `_ci_tmp/` is silent.

    snapshot = machine_snapshot()     # env.json's keys, plus "hostname" and "commit_source"

The runbook's plain pytest path runs no nox session, so `_ci_tmp/` holds no env.json and no
nvidia-smi capture; the checklist is then usually filled on the same machine right after,
and that machine knows its Python, packages, GPU and checkout. Whatever is taken from here
is marked so in the checklist ("from the machine running the report, not from _ci_tmp").

Standard library only, like the rest of the checklist: torch is not imported (its build's
CUDA version is read from `torch/version.py` as text).
"""

from __future__ import annotations

import platform
import re
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from difftrain.environment import PACKAGES, git_commit, query_nvidia_smi

CUDNN_PACKAGES = ("nvidia-cudnn-cu13", "nvidia-cudnn-cu12", "nvidia-cudnn-cu11")
TORCH_CUDA = re.compile(r"^cuda\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", re.MULTILINE)
FROM_MACHINE = "from the machine running the report, not from _ci_tmp"


def version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def torch_cuda() -> str | None:
    """The CUDA version torch was built for; "none (CPU build)"; None without torch."""
    try:
        dist = metadata.distribution("torch")
        text = Path(str(dist.locate_file("torch/version.py"))).read_text(encoding="utf-8")
    except (metadata.PackageNotFoundError, OSError):
        return None
    match = TORCH_CUDA.search(text)
    return match.group(1) if match else "none (CPU build)"


def cudnn() -> str | None:
    found = ((name, version(name)) for name in CUDNN_PACKAGES)
    return next((f"{v} ({name})" for name, v in found if v), None)


def run_text(command: list[str], cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(
            command, cwd=cwd, capture_output=True, text=True, timeout=20, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip() or None


def repo_commit() -> tuple[str | None, str]:
    """(`git rev-parse HEAD`, whose): difftrain's own checkout, else the current folder's."""
    commit = git_commit()
    if commit:
        return commit, "the difftrain checkout this report runs from"
    commit = run_text(["git", "rev-parse", "HEAD"], cwd=Path.cwd())
    return commit, "the git repository of the current folder"


def nvidia_smi_text() -> str | None:
    """The plain `nvidia-smi` table, as the runbook asks to capture; None without one."""
    return run_text(["nvidia-smi"])


def machine_snapshot() -> dict[str, object]:
    """This machine in env.json's shape (the keys the checklist's environment table reads)."""
    commit, commit_source = repo_commit()
    torch_version = version("torch")
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "torch": torch_version or "not installed",
        "cuda": torch_cuda() if torch_version else "n/a (torch not installed)",
        "cudnn": cudnn(),
        "gpus": [],  # names come from nvidia-smi: finding them through torch needs torch
        "nvidia_smi": query_nvidia_smi(),
        "packages": {name: version(name) for name in PACKAGES},
        "git_commit": commit,
        "commit_source": commit_source,
    }
