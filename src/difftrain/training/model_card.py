"""`OUTPUT_DIR/README.md`: a Hugging Face style model card describing what a run made.

Written at the end of training by the main process, from plain values (no torch), so it can
be tested and regenerated without a model:

    write_model_card(out, base_model=..., data_dir=..., num_images=..., settings={...},
                     final_loss=..., steps=..., lora=False, sample_grid=out / "samples/step-N.png")
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import yaml

from difftrain.io import atomic_write_text

BASE_TAGS = ["text-to-image", "diffusers", "difftrain"]

# `org/name` or `name`: the only `base_model` values the Hub accepts in card metadata.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def write_model_card(
    output_dir: Path,
    *,
    base_model: str,
    data_dir: str,
    num_images: int,
    settings: dict[str, object],
    final_loss: float | None,
    steps: int,
    lora: bool,
    sample_grid: Path | None,
    pipeline_class: str = "StableDiffusionPipeline",
    dropped: tuple[str, ...] = (),
    kohya: bool = False,
    single_file_config: str | None = None,
) -> Path:
    """Write `output_dir/README.md` (atomically) and return its path.

    `dropped`: components the run left out (SD3's T5), passed as None in the load code.
    `kohya`: the run also wrote its LoRA in the kohya format (lora.export_formats).
    `single_file_config`: model.single_file_config of a single-file base, which loading the
    base needs (without it diffusers guesses a config repository on the Hub).
    """
    output_dir = Path(output_dir)
    sections = [
        _front_matter(base_model, lora, pipeline_class),
        _title(output_dir, base_model, lora),
        _training_section(base_model, data_dir, num_images, steps, final_loss),
        _settings_table(settings),
        _samples_section(output_dir, sample_grid),
        _load_section(output_dir, base_model, lora, pipeline_class, dropped, single_file_config),
        _kohya_section() if lora and kohya else "",
    ]
    path = output_dir / "README.md"
    atomic_write_text(path, "\n".join(section for section in sections if section))
    return path


FAMILY_TAGS = {
    "StableDiffusionPipeline": ["stable-diffusion"],
    "StableDiffusionXLPipeline": ["stable-diffusion-xl"],
    "StableDiffusion3Pipeline": ["stable-diffusion-3", "sd3"],
    "FluxPipeline": ["flux"],
}


def _front_matter(base_model: str, lora: bool, pipeline_class: str) -> str:
    metadata: dict[str, object] = {"library_name": "diffusers"}
    # The Hub rejects a card whose base_model is not a model id; a local folder or
    # builtin:tiny is still named in the card's text.
    if _is_hub_id(base_model):
        metadata["base_model"] = base_model
    family_tags = FAMILY_TAGS.get(pipeline_class, [])
    metadata["tags"] = BASE_TAGS[:2] + family_tags + BASE_TAGS[2:] + (["lora"] if lora else [])
    return "---\n" + yaml.safe_dump(metadata, sort_keys=False) + "---\n"


def _is_hub_id(name: str) -> bool:
    return _HUB_ID.fullmatch(name) is not None and not Path(name).expanduser().is_dir()


def _title(output_dir: Path, base_model: str, lora: bool) -> str:
    kind = "LoRA adapters for" if lora else "A fine-tune of"
    return f"# {output_dir.name}\n\n{kind} `{base_model}`, trained with difftrain.\n"


def _training_section(
    base_model: str, data_dir: str, num_images: int, steps: int, final_loss: float | None
) -> str:
    images = f"{num_images} image" + ("" if num_images == 1 else "s")
    loss = "n/a (no step ran)" if final_loss is None else f"{final_loss:.6g}"
    return (
        "## Training\n\n"
        f"- Base model: `{base_model}`\n"
        f"- Data: `{data_dir}` ({images})\n"
        f"- Steps trained: {steps}\n"
        f"- Final loss: {loss}\n"
    )


def _settings_table(settings: dict[str, object]) -> str:
    if not settings:
        return ""
    rows = [f"| {_cell(key)} | {_cell(_format_value(value))} |" for key, value in settings.items()]
    return "## Settings\n\n| Setting | Value |\n| --- | --- |\n" + "\n".join(rows) + "\n"


def _format_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format_value(item) for item in value)
    return str(value)


def _cell(text: str) -> str:
    # A `|` would end the cell and a newline the row: escape the one, flatten the other.
    return " ".join(str(text).split()).replace("|", "\\|")


def _samples_section(output_dir: Path, sample_grid: Path | None) -> str:
    if sample_grid is None:
        return ""
    # Relative, so the image still shows after the folder is moved or pushed to the Hub.
    link = Path(os.path.relpath(sample_grid, output_dir)).as_posix()
    return f"## Samples\n\n![validation samples]({link})\n"


def _load_section(
    output_dir: Path,
    base_model: str,
    lora: bool,
    pipeline_class: str,
    dropped: tuple[str, ...],
    single_file_config: str | None,
) -> str:
    # json.dumps quotes a path as a valid Python string literal (backslashes included).
    out = json.dumps(str(output_dir.resolve()))
    # diffusers loads a pipeline saved without a component only when told it is None.
    out_args = out + "".join(f", {name}=None" for name in dropped)
    if lora:
        # A single-file base (model.pretrained: x.safetensors) loads with from_single_file,
        # its component configs from the run's model.single_file_config.
        single_file = single_file_config is not None or base_model.endswith(".safetensors")
        loader = "from_single_file" if single_file else "from_pretrained"
        config = f", config={json.dumps(single_file_config)}" if single_file_config else ""
        lines = [
            f"pipe = {pipeline_class}.{loader}({json.dumps(base_model)}{config}"
            + "".join(f", {name}=None" for name in dropped)
            + ")",
            f"pipe.load_lora_weights({out})",
        ]
    else:
        lines = [f"pipe = {pipeline_class}.from_pretrained({out_args})"]
    code = "\n".join(
        [
            f"from diffusers import {pipeline_class}",
            "",
            *lines,
            'image = pipe("a photo").images[0]',
        ]
    )
    return f"## How to load\n\n```python\n{code}\n```\n"


def _kohya_section() -> str:
    from difftrain.models.lora_kohya import KOHYA_WEIGHTS

    return (
        f"### ComfyUI, AUTOMATIC1111, Forge\n\n`{KOHYA_WEIGHTS}` holds the same adapters in "
        "the kohya key format: copy it into ComfyUI's `models/loras/` and pick it in a "
        "LoraLoader node (AUTOMATIC1111 / Forge: `models/Lora/`, then `<lora:NAME:1>` in "
        "the prompt). diffusers reads it too: "
        f'`pipe.load_lora_weights(folder, weight_name="{KOHYA_WEIGHTS}")`.\n'
    )
