"""Bad-input cases for LoRA export formats (`lora.export_formats`, the kohya / ComfyUI file)."""

from __future__ import annotations

from collections.abc import Callable

from bad_input_table import Case, Workspace


def _export_case(
    formats: str, expected: str, builtin: str = "tiny", enabled: str = "true"
) -> Callable[[Workspace], Case]:
    """Train a LoRA on `builtin:<builtin>` with `lora.export_formats: <formats>`."""

    def build(ws: Workspace) -> Case:
        config = ws.data_config(
            "lora-export",
            f"model: {{pretrained: 'builtin:{builtin}'}}\n"
            f"lora: {{enabled: {enabled}, export_formats: {formats}}}\n",
        )
        return Case(["train", "--config", config, *ws.out], expected)

    return build


_NOT_FOR = "lora.export_formats: kohya is written for SD 1.x/2.x and SDXL UNet LoRAs only, not "

CASES: dict[str, Callable[[Workspace], Case]] = {
    "lora.export_formats: kohya on sd3": _export_case(
        "[diffusers, kohya]", _NOT_FOR + "model family sd3", builtin="tiny-sd3"
    ),
    "lora.export_formats: kohya alone on flux": _export_case(
        "[kohya]", _NOT_FOR + "model family flux", builtin="tiny-flux"
    ),
    "lora.export_formats: empty": _export_case(
        "[]", "lora.export_formats: is empty; list at least one of diffusers, kohya"
    ),
    "lora.export_formats: kohya twice": _export_case(
        "[kohya, diffusers, kohya]", "lora.export_formats: lists kohya more than once"
    ),
    "lora.export_formats: kohya on a full fine-tune": _export_case(
        "[kohya]",
        "lora.export_formats: is set but LoRA is off, so a full fine-tune would run",
        enabled="false",
    ),
    "lora.export_formats: unknown format": _export_case(
        "[diffusers, comfyui]", "lora.export_formats[1]: must be one of diffusers, kohya"
    ),
}
