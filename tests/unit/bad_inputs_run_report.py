"""Bad-input cases for `difftrain report RUN_DIR` (the HTML run report)."""

from __future__ import annotations

from collections.abc import Callable

from bad_input_table import Case, Workspace

CASES: dict[str, Callable[[Workspace], Case]] = {}
