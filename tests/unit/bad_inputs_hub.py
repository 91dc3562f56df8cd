"""Bad-input cases for uploads to the Hugging Face Hub (`train.push_to_hub`, `hub.*`)."""

from __future__ import annotations

from collections.abc import Callable

from bad_input_table import Case, Workspace

CASES: dict[str, Callable[[Workspace], Case]] = {}
