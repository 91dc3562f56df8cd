"""Bad-input cases for `difftrain reproduce RUN_DIR` and the run's data manifest."""

from __future__ import annotations

from collections.abc import Callable

from bad_input_table import Case, Workspace

CASES: dict[str, Callable[[Workspace], Case]] = {}
