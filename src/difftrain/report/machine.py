"""Render the machine blocks: `environment` (GPU, driver, CUDA, packages) and `nvidia-smi`."""

from __future__ import annotations

import re

from difftrain.report.evidence import Evidence
from difftrain.report.markdown import NOT_FOUND, code_block, table


def env_dicts(ev: Evidence, key: str) -> list[dict]:
    """env.json's list of objects under `key` (gpus, nvidia_smi); [] for anything else."""
    value = (ev.env or {}).get(key)
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def env_packages(ev: Evidence) -> dict:
    packages = (ev.env or {}).get("packages")
    return packages if isinstance(packages, dict) else {}


def gpu_names(ev: Evidence) -> str | None:
    names = [str(g["name"]) for g in env_dicts(ev, "gpus") if g.get("name")]
    names = names or [row["name"] for row in smi_rows(ev) if row.get("name")]
    return ", ".join(names) or None


def smi_rows(ev: Evidence) -> list[dict[str, str]]:
    """nvidia-smi facts: the captured CSV, else the query env.json recorded."""
    return ev.smi_rows or env_dicts(ev, "nvidia_smi")


def smi_value(ev: Evidence, key: str) -> str | None:
    values = [row[key] for row in smi_rows(ev) if row.get(key)]
    return ", ".join(dict.fromkeys(values)) or None


def driver_cuda(ev: Evidence) -> str | None:
    match = re.search(r"CUDA Version:\s*([\d.]+)", ev.smi_text or "")
    return match.group(1) if match else None


def environment_rows(ev: Evidence) -> list[tuple[str, str]]:
    env = ev.env or {}
    packages = env_packages(ev)
    gpus = env_dicts(ev, "gpus")
    torch_cuda = env.get("cuda") or ("none (CPU build)" if env else None)
    cuda = f"{torch_cuda or NOT_FOUND} / driver supports {driver_cuda(ev) or NOT_FOUND}"
    memory = smi_value(ev, "memory.total") or (gpus and f"{gpus[0].get('memory_gib')} GiB")
    libraries = ", ".join(
        f"{name} {packages.get(name) or NOT_FOUND}"
        for name in ("diffusers", "transformers", "accelerate")
    )
    rows = [
        ("GPU model", gpu_names(ev)),
        ("GPU memory", memory),
        (
            "Compute capability",
            smi_value(ev, "compute_cap") or (gpus and gpus[0].get("capability")),
        ),
        ("NVIDIA driver", smi_value(ev, "driver_version")),
        ("CUDA (torch build / driver supports)", cuda),
        ("Python", env.get("python")),
        ("PyTorch", env.get("torch")),
        ("cuDNN", env.get("cudnn")),
        ("difftrain version", packages.get("difftrain")),
        ("difftrain commit", env.get("git_commit")),
        ("diffusers / transformers / accelerate", libraries if packages else None),
        ("Platform", env.get("platform")),
    ]
    return [
        (name, str(value) if value not in (None, "", []) else NOT_FOUND) for name, value in rows
    ]


def environment_sources(ev: Evidence) -> list[str]:
    lines = []
    if ev.env_path is None:
        lines.append(f"- env.json: {NOT_FOUND} under `{ev.ci_dir.name}`")
    else:
        kind = "a GPU run" if env_dicts(ev, "gpus") else "a CPU run (no env.json saw a GPU)"
        lines.append(
            f"- env.json: `{ev.rel(ev.env_path)}` (newest of {ev.env_files} found; from {kind})"
        )
    csv_path = ev.ci_dir / "logs" / "nvidia-smi.csv"
    lines.append(
        f"- nvidia-smi CSV: `{ev.rel(csv_path)}`"
        if ev.smi_rows
        else f"- nvidia-smi CSV: {NOT_FOUND}"
    )
    return lines


def render_environment(ev: Evidence) -> str:
    return "\n".join([table(("Item", "Value"), environment_rows(ev)), "", *environment_sources(ev)])


def render_nvidia_smi(ev: Evidence) -> str:
    path = ev.ci_dir / "logs" / "nvidia-smi.txt"
    if not (ev.smi_text or "").strip():
        return f"Not captured: `{ev.rel(path)}` {NOT_FOUND} (`nox -s gpu_smoke` writes it)."
    return f"From `{ev.rel(path)}`:\n\n{code_block(ev.smi_text)}"
