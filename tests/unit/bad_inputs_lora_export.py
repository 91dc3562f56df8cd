"""Bad-input cases for LoRA export formats (`lora.export_formats`, the kohya / ComfyUI file)."""

from __future__ import annotations

from collections.abc import Callable

from bad_input_table import Case, Workspace

CASES: dict[str, Callable[[Workspace], Case]] = {}
