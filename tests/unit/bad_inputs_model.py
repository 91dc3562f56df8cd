"""Bad-input cases for model folders and `difftrain sample`.

A broken model is a copy of the tiny pipeline (`ws.model` is shared and must stay as it is)
with one thing changed. Cases whose check needs the model loaded run in a child process, so
the one-line rule also covers what the libraries print on their own.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from bad_input_table import Case, Workspace

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
# A child process: what diffusers / transformers log goes to its real stderr, counted too.
CHILD = {"HF_HUB_OFFLINE": "1"}


def model_copy(ws: Workspace, name: str = "model") -> Path:
    copy = ws.root / name
    shutil.copytree(ws.model, copy)
    return copy


def edit_json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def train_on(ws: Workspace, model: Path | str, tag: str) -> list[str]:
    """`difftrain train` on the dummy data with `model.pretrained: model`."""
    config = ws.data_config(tag, f"model: {{pretrained: '{model}'}}\n")
    return ["train", "--config", config, *ws.out]


def sample_argv(ws: Workspace, *extra: str, model: Path | str | None = None) -> list[str]:
    """`difftrain sample` that would work (one step, CPU) but for `extra` and `model`."""
    return [
        "sample", "--model", str(model or ws.model), "--prompt", "a red circle", "--steps", "1",
        "--height", "64", "--width", "64", "--output", str(ws.root / "img.png"),
        "--device", "cpu", *extra,
    ]  # fmt: skip


# --- broken model folders, each a function of a fresh copy -------------------------------------


def _custom_pipeline_class(model: Path) -> None:
    edit_json(model / "model_index.json", lambda d: d.update(_class_name=["my_pipe", "MyPipe"]))


def _pipeline_class_diffusers_lacks(model: Path) -> None:
    edit_json(model / "model_index.json", lambda d: d.update(_class_name="MyFancyPipeline"))


def _component_from_custom_module(model: Path) -> None:
    edit_json(model / "model_index.json", lambda d: d.update(unet=["my_module", "MyUNet"]))


def _auto_map(model: Path) -> None:
    edit_json(
        model / "text_encoder" / "config.json",
        lambda d: d.update(auto_map={"AutoModel": "modeling_clip.MyCLIP"}),
    )


def _top_level_python(model: Path) -> None:
    (model / "pipeline.py").write_text("class MyPipe: ...\n")


def _component_python(model: Path) -> None:
    (model / "unet" / "modeling_unet.py").write_text("class MyUNet: ...\n")


def _other_pipeline(model: Path) -> None:
    edit_json(model / "model_index.json", lambda d: d.update(_class_name="KandinskyV22Pipeline"))


def _unknown_scheduler(model: Path) -> None:
    edit_json(
        model / "scheduler" / "scheduler_config.json",
        lambda d: d.update(_class_name="FancyScheduler"),
    )


def _no_vae(model: Path) -> None:
    shutil.rmtree(model / "vae")


def _unet_config_not_json(model: Path) -> None:
    (model / "unet" / "config.json").write_text('{"block_out_channels": [32, 6')


def _no_model_index(model: Path) -> None:
    (model / "model_index.json").unlink()


def _truncated_unet(model: Path) -> None:
    weights = model / UNET_WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])


def _no_unet_weights(model: Path) -> None:
    (model / UNET_WEIGHTS).unlink()


BROKEN_MODELS: dict[str, tuple[Callable[[Path], None], str]] = {
    "custom pipeline class": (
        _custom_pipeline_class,
        "['my_pipe', 'MyPipe'], a custom pipeline which needs trust_remote_code",
    ),
    "pipeline class diffusers lacks": (
        _pipeline_class_diffusers_lacks,
        "pipeline class 'MyFancyPipeline' (model_index.json _class_name) is not in diffusers",
    ),
    "component from a custom module": (
        _component_from_custom_module,
        "component unet is ['my_module', 'MyUNet'], from the model's own module 'my_module', "
        "which needs trust_remote_code",
    ),
    "auto_map in a component config": (
        _auto_map,
        "text_encoder/config.json has an auto_map into the model's own code, which needs "
        "trust_remote_code",
    ),
    "python file in the folder": (_top_level_python, "ships Python code (pipeline.py)"),
    "python file in a component": (_component_python, "ships Python code (unet/modeling_unet.py)"),
    "not a pipeline difftrain trains": (
        _other_pipeline,
        "is a KandinskyV22Pipeline, which difftrain does not train; it trains "
        "StableDiffusionPipeline (sd), StableDiffusionXLPipeline (sdxl)",
    ),
    "unknown scheduler class": (
        _unknown_scheduler,
        "scheduler/scheduler_config.json names scheduler class 'FancyScheduler', which diffusers",
    ),
    "missing vae folder": (_no_vae, "has no vae/ folder; a Stable Diffusion pipeline needs"),
    "unet config not JSON": (_unet_config_not_json, "unet/config.json is not valid JSON"),
    "no model_index.json": (_no_model_index, "is not a diffusers pipeline folder"),
    "truncated unet weights": (
        _truncated_unet,
        f"{UNET_WEIGHTS} is damaged or truncated (Error while deserializing header",
    ),
    "no unet weights": (_no_unet_weights, "unet/ has no weights file"),
}


def _train_on_broken(name: str) -> Callable[[Workspace], Case]:
    breaks, expected = BROKEN_MODELS[name]

    def build(ws: Workspace) -> Case:
        model = model_copy(ws)
        breaks(model)
        return Case(train_on(ws, model, "m"), expected)

    return build


def _sample_from_broken(name: str) -> Callable[[Workspace], Case]:
    """The same folder checks guard `sample --model`."""
    breaks, expected = BROKEN_MODELS[name]

    def build(ws: Workspace) -> Case:
        model = model_copy(ws)
        breaks(model)
        return Case(sample_argv(ws, model=model), expected)

    return build


# --- other model sources -----------------------------------------------------------------------


def _missing_model(ws: Workspace) -> Case:
    config = ws.data_config("m", "model: {pretrained: ./no/model}\n")
    return Case(
        ["train", "--config", config, *ws.out], "model.pretrained: folder ./no/model does not exist"
    )


def _offline_hub_id(ws: Workspace) -> Case:
    return Case(
        train_on(ws, "nobody/nothing", "h"),
        "model.pretrained: could not load 'nobody/nothing': Cannot find an appropriate cached "
        "snapshot folder",
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(ws.root / "hf")},
    )


def _tiny_model_into_full_folder(ws: Workspace) -> Case:
    return Case(
        ["make-tiny-model", "--output-dir", str(ws.data)],
        "is not empty; choose a new or empty folder",
    )


# --- difftrain sample ---------------------------------------------------------------------------


def _sample_offline_hub_id(ws: Workspace) -> Case:
    return Case(
        sample_argv(ws, model="nobody/nothing"),
        "--model: could not load 'nobody/nothing': Cannot find an appropriate cached snapshot",
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(ws.root / "hf")},
    )


def _sample_missing_model(ws: Workspace) -> Case:
    return Case(
        sample_argv(ws, model=ws.root / "no-model"),
        f"--model: folder {ws.root / 'no-model'} does not exist",
    )


def _sample_output_is_folder(ws: Workspace) -> Case:
    return Case(
        sample_argv(ws, "--output", str(ws.data)),
        f"--output {ws.data} is a folder; give an image file name such as",
    )


def _sample_unknown_extension(ws: Workspace) -> Case:
    return Case(
        sample_argv(ws, "--output", str(ws.root / "x.xyz")),
        ".xyz is not an image format PIL can write; use .png, .jpg or .webp",
    )


def _sample_no_extension(ws: Workspace) -> Case:
    return Case(
        sample_argv(ws, "--output", str(ws.root / "image")),
        "no extension is not an image format PIL can write",
    )


def _sample_parent_is_file(ws: Workspace) -> Case:
    blocker = ws.root / "a-file"
    blocker.write_text("not a folder\n")
    return Case(
        sample_argv(ws, "--output", str(blocker / "sub" / "x.png")),
        f"{blocker} is a file, not a folder; choose another path",
    )


def _sample_option(option: str, value: str, expected: str) -> Callable[[Workspace], Case]:
    return lambda ws: Case(sample_argv(ws, option, value), expected)


def _sample_lora_missing(ws: Workspace) -> Case:
    return Case(
        sample_argv(ws, "--lora", str(ws.root / "no-lora")),
        f"--lora {ws.root / 'no-lora'}: no such file or folder",
    )


def _sample_lora_empty_folder(ws: Workspace) -> Case:
    folder = ws.folder("empty-lora")
    return Case(
        sample_argv(ws, "--lora", str(folder)),
        f"--lora {folder}: no pytorch_lora_weights.safetensors in this folder",
    )


def _sample_lora_not_safetensors(ws: Workspace) -> Case:
    pickle_file = ws.root / "lora.bin"
    pickle_file.write_bytes(b"\x80\x04N.")
    return Case(
        sample_argv(ws, "--lora", str(pickle_file)),
        "not a .safetensors file; difftrain reads LoRA weights from safetensors only",
    )


def _sample_lora_garbage(ws: Workspace) -> Case:
    folder = ws.folder("garbage-lora")
    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"this is no safetensors file")
    return Case(
        sample_argv(ws, "--lora", str(folder)),
        "pytorch_lora_weights.safetensors is damaged or not a safetensors file",
    )


def _sample_lora_not_lora(ws: Workspace) -> Case:
    # Real weights, but a whole UNet's, not adapters.
    folder = ws.folder("unet-as-lora")
    shutil.copy(ws.model / UNET_WEIGHTS, folder / "pytorch_lora_weights.safetensors")
    return Case(
        sample_argv(ws, "--lora", str(folder)),
        "pytorch_lora_weights.safetensors holds no LoRA weights (no tensor name contains 'lora')",
    )


def _save_lora_file(path: Path, tensors: dict[str, tuple[int, int]]) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({name: torch.zeros(shape) for name, shape in tensors.items()}, str(path))


def _sample_lora_other_model(ws: Workspace) -> Case:
    # LoRA for a model whose attention is 7 wide: the tiny UNet's to_q takes 32 features.
    lora = ws.root / "other-model-lora.safetensors"
    prefix = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora."
    _save_lora_file(lora, {prefix + "down.weight": (4, 7), prefix + "up.weight": (7, 4)})
    return Case(
        sample_argv(ws, "--lora", str(lora)),
        "these are not LoRA weights for this model (Error(s) in loading state_dict for "
        "UNet2DConditionModel: size mismatch",
        env=CHILD,
    )


def _sample_lora_for_nothing(ws: Workspace) -> Case:
    # LoRA-shaped names under a prefix diffusers assigns to no component: it skips them all.
    lora = ws.root / "stray-lora.safetensors"
    _save_lora_file(
        lora, {"prior.block.lora.down.weight": (4, 8), "prior.block.lora.up.weight": (8, 4)}
    )
    return Case(
        sample_argv(ws, "--lora", str(lora)),
        "none of its weights is for this model's unet or text encoder",
        env=CHILD,
    )


def _no_cuda(monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _sample_cuda_without_cuda(ws: Workspace) -> Case:
    return Case(
        sample_argv(ws, "--device", "cuda"),
        "--device cuda: no cuda device on this machine; use cpu",
        patch=_no_cuda,
    )


def _partial_unet(ws: Workspace) -> Path:
    """The unet's weights as a pickled .bin (plain tensors: safe to load) missing half of them."""
    import torch
    from safetensors.torch import load_file

    model = model_copy(ws, "partial")
    weights = load_file(model / UNET_WEIGHTS)
    (model / UNET_WEIGHTS).unlink()
    half = dict(list(weights.items())[: len(weights) // 2])
    torch.save(half, model / "unet" / "diffusion_pytorch_model.bin")
    return model


def _train_on_partial_weights(ws: Workspace) -> Case:
    return Case(train_on(ws, _partial_unet(ws), "pw"), "unet weights lack", env=CHILD,
                may_create=("out",))  # fmt: skip


def _sample_partial_weights(ws: Workspace) -> Case:
    return Case(sample_argv(ws, model=_partial_unet(ws)), "unet weights lack", env=CHILD)


CASES = {
    "model: weights missing tensors (train)": _train_on_partial_weights,
    "sample: weights missing tensors": _sample_partial_weights,
    "model: missing folder": _missing_model,
    "model: hub id not in the offline cache": _offline_hub_id,
    "make-tiny-model: into a full folder": _tiny_model_into_full_folder,
    **{f"model: {name}": _train_on_broken(name) for name in BROKEN_MODELS},
    **{f"sample: model with {name}": _sample_from_broken(name) for name in BROKEN_MODELS},
    "sample: hub id not in the offline cache": _sample_offline_hub_id,
    "sample: missing model folder": _sample_missing_model,
    "sample: output is a folder": _sample_output_is_folder,
    "sample: output extension unknown": _sample_unknown_extension,
    "sample: output without extension": _sample_no_extension,
    "sample: output parent is a file": _sample_parent_is_file,
    "sample: height not a multiple of 8": _sample_option(
        "--height", "60", "--height: must be a positive multiple of 8, got 60"
    ),
    "sample: width zero": _sample_option(
        "--width", "0", "--width: must be a positive multiple of 8, got 0"
    ),
    "sample: negative height": _sample_option(
        "--height", "-64", "--height: must be a positive multiple of 8, got -64"
    ),
    "sample: zero steps": _sample_option("--steps", "0", "--steps: must be at least 1, got 0"),
    "sample: negative steps": _sample_option(
        "--steps", "-5", "--steps: must be at least 1, got -5"
    ),
    "sample: guidance scale nan": _sample_option(
        "--guidance-scale", "nan", "--guidance-scale: must be a finite number, got nan"
    ),
    "sample: guidance scale inf": _sample_option(
        "--guidance-scale", "inf", "--guidance-scale: must be a finite number, got inf"
    ),
    "sample: lora missing": _sample_lora_missing,
    "sample: lora folder without weights": _sample_lora_empty_folder,
    "sample: lora file not safetensors": _sample_lora_not_safetensors,
    "sample: lora file garbage": _sample_lora_garbage,
    "sample: lora file without lora tensors": _sample_lora_not_lora,
    "sample: lora for another model": _sample_lora_other_model,
    "sample: lora for no component": _sample_lora_for_nothing,
    "sample: unknown device": _sample_option(
        "--device", "tpu7", "--device tpu7: unknown device; use cpu, cuda, cuda:N or mps"
    ),
    "sample: cuda without CUDA": _sample_cuda_without_cuda,
}
