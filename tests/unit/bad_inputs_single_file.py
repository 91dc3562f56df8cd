"""Bad-input cases for single-file checkpoints: `difftrain export --format single-file` and `model.pretrained` naming a .safetensors file."""

from __future__ import annotations

from collections.abc import Callable

from bad_input_table import Case, Workspace

CASES: dict[str, Callable[[Workspace], Case]] = {}
