"""Bad-input cases for single-file checkpoints: `difftrain export --format single-file` and
`model.pretrained` naming a .safetensors file."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from bad_input_table import Case, Workspace

# A child process: offline mode is read when huggingface_hub is imported, and what the
# libraries print on their own is counted too.
CHILD = {"HF_HUB_OFFLINE": "1"}


def export_argv(ws: Workspace, run_dir: Path | str, output: Path | str | None = None,
                *extra: str) -> list[str]:  # fmt: skip
    output = output or ws.root / "model.safetensors"
    return ["export", str(run_dir), "--output", str(output), *extra]


def tiny_file(ws: Workspace, folder: Path | None = None, family: str = "sd") -> Path:
    """The tiny pipeline (or `folder`) exported to the workspace as one file."""
    from difftrain.export_command import write_checkpoint
    from difftrain.models.single_file import original_checkpoint

    tensors, _ = original_checkpoint(folder or ws.model, family)
    path = ws.root / f"{family}.safetensors"
    write_checkpoint(tensors, {"format": "pt"}, path)
    return path


def train_from(ws: Workspace, file: Path | str, config: Path | str | None, tag: str) -> list[str]:
    extra = f", single_file_config: '{config}'" if config is not None else ""
    path = ws.data_config(tag, f"model: {{pretrained: '{file}'{extra}}}\n")
    return ["train", "--config", path, *ws.out]


# --- export ------------------------------------------------------------------------------------


def not_converted(monkeypatch) -> None:
    """--output is refused before the pipeline is converted (minutes, for a large model)."""
    import difftrain.models.single_file as single_file

    def original_checkpoint(folder, family):
        raise AssertionError("converted the pipeline before refusing --output")

    monkeypatch.setattr(single_file, "original_checkpoint", original_checkpoint)


def _export_not_a_pipeline(ws: Workspace) -> Case:
    return Case(export_argv(ws, ws.data), "is not a diffusers pipeline folder (no model_index")


def _export_missing_run_dir(ws: Workspace) -> Case:
    return Case(export_argv(ws, ws.root / "nope"), "nope: no such folder")


def _export_lora_run(ws: Workspace) -> Case:
    run = ws.folder("lora-run")
    (run / "pytorch_lora_weights.safetensors").write_bytes(b"adapters")
    (run / "config.yaml").write_text("lora: {enabled: true}\n")
    return Case(export_argv(ws, run), "is a LoRA run (adapters, no pipeline)")


def _export_lora_points_to_kohya(ws: Workspace) -> Case:
    run = ws.folder("lora-run")
    (run / "config.yaml").write_text("lora: {enabled: true, rank: 4}\n")
    return Case(export_argv(ws, run), "LoRA files train with lora.export_formats: [kohya]")


def _export_unknown_format(ws: Workspace) -> Case:
    argv = export_argv(ws, ws.model, None, "--format", "ckpt")
    return Case(argv, "--format: unknown format 'ckpt'; use one of single-file")


def _export_output_exists(ws: Workspace) -> Case:
    existing = ws.root / "model.safetensors"
    existing.write_bytes(b"someone's checkpoint")
    return Case(export_argv(ws, ws.model, existing), "exists; pass --overwrite to replace it")


def _export_output_not_safetensors(ws: Workspace) -> Case:
    return Case(export_argv(ws, ws.model, ws.root / "model.ckpt"), "name a .safetensors file")


def _export_output_is_a_folder(ws: Workspace) -> Case:
    folder = ws.folder("out.safetensors")
    return Case(export_argv(ws, ws.model, folder, "--overwrite"), "is a folder; name the")


def _export_into_its_own_component(ws: Workspace) -> Case:
    target = ws.model / "unet" / "model.safetensors"
    return Case(export_argv(ws, ws.model, target, "--overwrite"), "is inside RUN_DIR's unet/")


def _export_into_a_linked_component(ws: Workspace) -> Case:
    """A component folder that is a link elsewhere: --output under the link's target is
    still inside the component."""
    run = ws.root / "run"
    shutil.copytree(ws.model, run)
    elsewhere = ws.folder("elsewhere")
    (run / "unet").rename(elsewhere / "unet")
    (run / "unet").symlink_to(elsewhere / "unet", target_is_directory=True)
    target = elsewhere / "unet" / "out.safetensors"
    return Case(export_argv(ws, run, target), "is inside RUN_DIR's unet/", patch=not_converted)


def _export_output_under_a_file(ws: Workspace) -> Case:
    target = ws.model / "model_index.json" / "x.safetensors"
    return Case(export_argv(ws, ws.model, target), "model_index.json is a file, not a folder",
                patch=not_converted)  # fmt: skip


def _export_output_in_an_unwritable_folder(ws: Workspace) -> Case:
    if not Path("/proc/self").is_dir():
        pytest.skip("needs /proc, a folder no one can make files in")
    target = Path("/proc/x.safetensors")
    return Case(export_argv(ws, ws.model, target), "cannot write in /proc", patch=not_converted)


def _export_shard_index_not_of_file_names(ws: Workspace) -> Case:
    run = ws.root / "run"
    shutil.copytree(ws.model, run)
    index = {"weight_map": {"conv_in.weight": 5}}
    (run / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return Case(export_argv(ws, run), "has no weight_map of tensor names to shard file names")


def _export_shard_out_of_the_folder(ws: Workspace) -> Case:
    run = ws.root / "run"
    shutil.copytree(ws.model, run)
    index = {"weight_map": {"conv_in.weight": "../vae/diffusion_pytorch_model.safetensors"}}
    (run / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return Case(export_argv(ws, run), "names a shard outside the folder")


def _export_disk_full(ws: Workspace) -> Case:
    """A full disk mid-write: the old --output stays whole, no temporary file is left."""
    existing = ws.root / "model.safetensors"
    existing.write_bytes(b"the previous export")

    def full_disk(monkeypatch) -> None:
        import safetensors.torch

        def save_file(tensors, path, metadata=None):
            Path(path).write_bytes(b"half a checkpoint")
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(safetensors.torch, "save_file", save_file)

    argv = export_argv(ws, ws.model, existing, "--overwrite")
    return Case(argv, "could not write it (No space left on device)", patch=full_disk)


def _export_without_weights(ws: Workspace) -> Case:
    run = ws.root / "run"
    shutil.copytree(ws.model, run)
    (run / "text_encoder" / "model.safetensors").unlink()
    return Case(export_argv(ws, run), "text_encoder/ has no weights file")


# --- training from a file --------------------------------------------------------------------


def _pickle_checkpoint(ws: Workspace) -> Case:
    path = ws.root / "model.ckpt"
    path.write_bytes(b"\x80\x04pickle")
    return Case(train_from(ws, path, ws.model, "ckpt"), "is a .ckpt file, a pickle, and loading")


def _missing_file(ws: Workspace) -> Case:
    return Case(train_from(ws, ws.root / "nope.safetensors", ws.model, "nf"), "does not exist")


def _damaged_file(ws: Workspace) -> Case:
    path = ws.root / "broken.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    return Case(train_from(ws, path, ws.model, "dmg"), "is not a readable safetensors file")


def _offline_without_config(ws: Workspace) -> Case:
    argv = train_from(ws, tiny_file(ws), None, "off")
    return Case(argv, "model.single_file_config: is not set, and offline", env=CHILD)


def _config_without_single_file(ws: Workspace) -> Case:
    argv = train_from(ws, ws.model, ws.model, "nosf")
    return Case(argv, "model.single_file_config: applies only when model.pretrained is a")


def _config_folder_missing(ws: Workspace) -> Case:
    argv = train_from(ws, tiny_file(ws), ws.root / "nowhere", "cfm")
    return Case(argv, "model.single_file_config: folder")


def _config_not_a_pipeline(ws: Workspace) -> Case:
    argv = train_from(ws, tiny_file(ws), ws.data, "cnp")
    return Case(argv, "has no model_index.json; it is not a diffusers pipeline")


def _config_of_another_family(ws: Workspace) -> Case:
    from difftrain.models.tiny import builtin_model_path

    argv = train_from(ws, tiny_file(ws), builtin_model_path("builtin:tiny-sdxl"), "fam")
    return Case(
        argv, "is a Stable Diffusion checkpoint (by its keys), but model.single_file_config"
    )


def _config_of_other_shapes(ws: Workspace) -> Case:
    config = ws.root / "wider"
    shutil.copytree(ws.model, config, ignore=shutil.ignore_patterns("*.safetensors"))
    unet = config / "unet" / "config.json"
    unet.write_text(json.dumps({**json.loads(unet.read_text()), "block_out_channels": [32, 48]}))
    argv = train_from(ws, tiny_file(ws), config, "shape")
    expected = "diffusers could not load it (Cannot load because down_blocks.1.resnets.0"
    return Case(argv, expected, env=CHILD, may_create=("out",))


def _sdxl_twin_encoders(ws: Workspace) -> Case:
    from difftrain.models.tiny import builtin_model_path

    folder = builtin_model_path("builtin:tiny-sdxl")
    argv = train_from(ws, tiny_file(ws, folder, "sdxl"), folder, "twin")
    return Case(argv, "two text encoders have the same width (32)")


def _sample_a_single_file(ws: Workspace) -> Case:
    argv = ["sample", "--model", str(tiny_file(ws)), "--prompt", "a circle", "--steps", "1",
            "--output", str(ws.root / "img.png"), "--device", "cpu"]  # fmt: skip
    return Case(argv, "is a single-file checkpoint, which only training reads")


CASES: dict[str, Callable[[Workspace], Case]] = {
    "export: RUN_DIR is not a pipeline folder": _export_not_a_pipeline,
    "export: RUN_DIR does not exist": _export_missing_run_dir,
    "export: RUN_DIR is a LoRA run": _export_lora_run,
    "export: a LoRA run's config points to the kohya format": _export_lora_points_to_kohya,
    "export: unknown --format": _export_unknown_format,
    "export: --output exists": _export_output_exists,
    "export: --output is not .safetensors": _export_output_not_safetensors,
    "export: --output is a folder": _export_output_is_a_folder,
    "export: --output inside a component of RUN_DIR": _export_into_its_own_component,
    "export: --output inside a component linked from RUN_DIR": _export_into_a_linked_component,
    "export: --output under a file": _export_output_under_a_file,
    "export: --output in a folder no one can write": _export_output_in_an_unwritable_folder,
    "export: a component without weights": _export_without_weights,
    "export: the disk fills up": _export_disk_full,
    "export: a shard index pointing out of its folder": _export_shard_out_of_the_folder,
    "export: a shard index whose shards are not file names": _export_shard_index_not_of_file_names,
    "single file: a pickle checkpoint": _pickle_checkpoint,
    "single file: no such file": _missing_file,
    "single file: not a safetensors file": _damaged_file,
    "single file: offline without single_file_config": _offline_without_config,
    "single file: single_file_config with a folder": _config_without_single_file,
    "single file: single_file_config folder missing": _config_folder_missing,
    "single file: single_file_config is no pipeline": _config_not_a_pipeline,
    "single file: single_file_config of another family": _config_of_another_family,
    "single file: single_file_config of other shapes": _config_of_other_shapes,
    "single file: SDXL encoders of one width": _sdxl_twin_encoders,
    "single file: sample --model a file": _sample_a_single_file,
}
