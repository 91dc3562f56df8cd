"""Render the machine blocks: `environment` (GPU, driver, CUDA, packages) and `nvidia-smi`.

Both describe the test machine from what the ci-dir recorded (env.json, the nvidia-smi
captures); where it recorded nothing, from the machine running the report (local_machine),
and the block says so.
"""

from __future__ import annotations

import re

from difftrain.report.evidence import Evidence
from difftrain.report.local_machine import FROM_MACHINE
from difftrain.report.markdown import NOT_FOUND, code_block, table


def described_env(ev: Evidence) -> tuple[dict, bool]:
    """(the env.json-shaped facts the table shows, whether they come from this machine)."""
    return (ev.env, False) if ev.env is not None else (ev.machine, True)


def env_dicts(env: dict, key: str) -> list[dict]:
    """env.json's list of objects under `key` (gpus, nvidia_smi); [] for anything else."""
    value = env.get(key)
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def env_packages(ev: Evidence) -> dict:
    """The package versions the ci-dir's env.json recorded ({} without one)."""
    packages = (ev.env or {}).get("packages")
    return packages if isinstance(packages, dict) else {}


def smi_rows(ev: Evidence, env: dict) -> list[dict[str, str]]:
    """nvidia-smi facts: the captured CSV, else the query env.json (or this machine) made."""
    return ev.smi_rows or env_dicts(env, "nvidia_smi")


def smi_value(ev: Evidence, env: dict, key: str) -> str | None:
    values = [row[key] for row in smi_rows(ev, env) if row.get(key)]
    return ", ".join(dict.fromkeys(values)) or None


def smi_text(ev: Evidence, from_machine: bool) -> str | None:
    """The nvidia-smi table: the captured one, else (env from this machine) a fresh one."""
    if (ev.smi_text or "").strip():
        return ev.smi_text
    return ev.machine_smi_text if from_machine else None


def driver_cuda(text: str | None) -> str | None:
    match = re.search(r"CUDA Version:\s*([\d.]+)", text or "")
    return match.group(1) if match else None


def environment_rows(ev: Evidence) -> list[tuple[str, str]]:
    env, from_machine = described_env(ev)
    raw_packages = env.get("packages")
    packages = raw_packages if isinstance(raw_packages, dict) else {}
    gpus = env_dicts(env, "gpus")
    names = [str(g["name"]) for g in gpus if g.get("name")]
    names = names or [row["name"] for row in smi_rows(ev, env) if row.get("name")]
    torch_cuda = env.get("cuda") or ("none (CPU build)" if env else None)
    driver = driver_cuda(smi_text(ev, from_machine))
    cuda = f"{torch_cuda or NOT_FOUND} / driver supports {driver or NOT_FOUND}"
    memory = smi_value(ev, env, "memory.total") or (gpus and f"{gpus[0].get('memory_gib')} GiB")
    libraries = ", ".join(
        f"{name} {packages.get(name) or NOT_FOUND}"
        for name in ("diffusers", "transformers", "accelerate")
    )
    rows = [
        ("GPU model", ", ".join(names)),
        ("GPU memory", memory),
        (
            "Compute capability",
            smi_value(ev, env, "compute_cap") or (gpus and gpus[0].get("capability")),
        ),
        ("NVIDIA driver", smi_value(ev, env, "driver_version")),
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
        host = ev.machine.get("hostname") or "this machine"
        lines.append(
            f"- env.json: {NOT_FOUND} under `{ev.ci_dir.name}`; the table is filled "
            f"{FROM_MACHINE} (`{host}`, when the report was made): correct it if the tests "
            "ran elsewhere"
        )
    else:
        kind = (
            "a GPU run" if env_dicts(ev.env or {}, "gpus") else "a CPU run (no env.json saw a GPU)"
        )
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
    if (ev.smi_text or "").strip():
        return f"From `{ev.rel(path)}`:\n\n{code_block(ev.smi_text)}"
    _env, from_machine = described_env(ev)
    captured = smi_text(ev, from_machine)
    if captured:
        return (
            f"`{ev.rel(path)}` {NOT_FOUND}; `nvidia-smi` run now, {FROM_MACHINE}:\n\n"
            f"{code_block(captured)}"
        )
    where = " and no `nvidia-smi` on the machine running the report" if from_machine else ""
    return f"Not captured: `{ev.rel(path)}` {NOT_FOUND}{where} (`nox -s gpu_smoke` writes it)."
