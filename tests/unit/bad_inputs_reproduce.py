"""Bad-input cases for `difftrain reproduce RUN_DIR` and the run's data manifest.

Each case lays out a finished run's record by hand (config.yaml, env.json, metrics.jsonl,
data_manifest.json, as a run writes them), so the refusals are checked without training.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from bad_input_table import Case, Workspace


def recorded_run(ws: Workspace, edit_env=None, manifest: bool = True, extra: str = "") -> Path:
    """A run folder of the workspace's tiny model on its dummy data; `edit_env(env)` changes
    the recorded environment."""
    from difftrain.config import dump_config, resolve_run_config
    from difftrain.data.manifest import write_manifest
    from difftrain.data.sources import scan_sources
    from difftrain.environment import collect_environment

    run = ws.folder("run")
    config = ws.data_config("run", f"model: {{pretrained: '{ws.model}'}}\n" + extra)
    cfg = resolve_run_config(config, output_dir=str(run))
    dump_config(cfg, run / "config.yaml")
    env = {**collect_environment(), "processes": {"num_processes": 1}}
    if edit_env is not None:
        edit_env(env)
    (run / "env.json").write_text(json.dumps(env))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5}) + "\n")
    if manifest:
        write_manifest(run, scan_sources(cfg.data), cfg.data, cfg.validation)
    return run


def reproduce(run: Path, *extra: str) -> list[str]:
    return ["reproduce", str(run), *extra]


def edited_image(ws: Workspace) -> Case:
    run = recorded_run(ws)
    image = sorted(ws.data.glob("*.png"))[1]
    image.write_bytes(image.read_bytes() + b"\0")  # same name, other content
    return Case(reproduce(run), f"the data differs from {run}/data_manifest.json: image {image} "
                "has other content; restore what the run had, or pass --force")  # fmt: skip


def removed_image(ws: Workspace) -> Case:
    run = recorded_run(ws)
    image = sorted(ws.data.glob("*.png"))[0]
    image.unlink()
    metadata = ws.data / "metadata.jsonl"
    lines = metadata.read_text().splitlines()
    metadata.write_text("".join(f"{line}\n" for line in lines if image.name not in line))
    return Case(reproduce(run), f"{image} is gone")


def other_packages(ws: Workspace) -> Case:
    run = recorded_run(ws, lambda env: env["packages"].update(torch="2.0.0"))
    return Case(reproduce(run), "package versions differ from")


def other_hardware(ws: Workspace) -> Case:
    run = recorded_run(ws, lambda env: env.update(gpus=[{"name": "NVIDIA H200"}]))
    return Case(reproduce(run), "the run trained on 1 x NVIDIA H200, this machine is a CPU")


def other_process_count(ws: Workspace) -> Case:
    run = recorded_run(ws, lambda env: env.update(processes={"num_processes": 2}))
    return Case(reproduce(run), "the run trained on 2 processes and reproduce trains on one")


def no_manifest(ws: Workspace) -> Case:
    run = recorded_run(ws, manifest=False)
    return Case(reproduce(run), "the run has no data_manifest.json")


def steps_out_of_range(ws: Workspace) -> Case:
    run = recorded_run(ws)
    return Case(reproduce(run, "--steps", "2"), "metrics.jsonl holds steps 1 to 1")


def not_a_run(ws: Workspace) -> Case:
    folder = ws.folder("not-a-run")
    (folder / "notes.txt").write_text("mine")
    return Case(reproduce(folder), "has no config.yaml, so it is not a finished difftrain run")


def missing_folder(ws: Workspace) -> Case:
    return Case(reproduce(ws.root / "nowhere"), "no such folder")


def torn_metrics(ws: Workspace) -> Case:
    run = recorded_run(ws)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss"')  # a kill in the first line
    return Case(reproduce(run), "metrics.jsonl records no step; there is nothing to compare")


def edited_caption(ws: Workspace) -> Case:
    run = recorded_run(ws)
    metadata = ws.data / "metadata.jsonl"
    metadata.write_text(metadata.read_text().replace("a red circle", "a blue circle", 1))
    image = ws.data / "00000.png"
    return Case(reproduce(run), f"the caption of image {image} changed")


def edited_validation_image(ws: Workspace) -> Case:
    import shutil

    held_out = Path(shutil.copytree(ws.data, ws.root / "held_out"))
    run = recorded_run(ws, extra=f"validation: {{loss_dir: '{held_out}', loss_every_steps: 1}}\n")
    image = held_out / "00002.png"
    image.write_bytes(image.read_bytes() + b"\0")
    return Case(reproduce(run), f"validation image {image} has other content")


CASES: dict[str, Callable[[Workspace], Case]] = {
    "reproduce: an image edited under its name": edited_image,
    "reproduce: an image removed": removed_image,
    "reproduce: other package versions": other_packages,
    "reproduce: other hardware": other_hardware,
    "reproduce: other process count": other_process_count,
    "reproduce: a run without data_manifest.json": no_manifest,
    "reproduce: --steps beyond the run": steps_out_of_range,
    "reproduce: a folder that is not a run": not_a_run,
    "reproduce: a folder that does not exist": missing_folder,
    "reproduce: torn metrics.jsonl": torn_metrics,
    "reproduce: a caption edited": edited_caption,
    "reproduce: a held-out image edited": edited_validation_image,
}
