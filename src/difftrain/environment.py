"""A snapshot of the software and hardware a run used (`env.json`, `difftrain env`)."""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = (
    "difftrain",
    "torch",
    "diffusers",
    "transformers",
    "accelerate",
    "peft",
    "safetensors",
    "huggingface_hub",
    "tokenizers",
    "numpy",
    "pillow",
    "pyyaml",
)
NVIDIA_SMI_QUERY = "name,driver_version,memory.total,compute_cap"


def collect_environment() -> dict[str, object]:
    import torch

    from difftrain.training.determinism import determinism_flags

    cuda_available = torch.cuda.is_available()
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "executable": sys.executable,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": cuda_available,
        "gpus": [_gpu(torch, index) for index in range(torch.cuda.device_count())]
        if cuda_available
        else [],
        "nvidia_smi": query_nvidia_smi(),
        "packages": {name: _version(name) for name in PACKAGES},
        "determinism": determinism_flags(),
        "git_commit": git_commit(),
    }


def _gpu(torch, index: int) -> dict[str, object]:
    props = torch.cuda.get_device_properties(index)
    return {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 2),
    }


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def query_nvidia_smi() -> list[dict[str, str]] | None:
    """GPU name, driver, memory and compute capability per GPU; None without nvidia-smi."""
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={NVIDIA_SMI_QUERY}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    keys = NVIDIA_SMI_QUERY.split(",")
    return [
        dict(zip(keys, (v.strip() for v in line.split(",")), strict=False))
        for line in out.splitlines()
        if line.strip()
    ]


def git_commit() -> str | None:
    """The commit of the difftrain checkout this code runs from, when it is one."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None
