"""Bad-input cases for values out of any sane range, and other commands' odd arguments."""

from __future__ import annotations

from bad_input_table import Case, Workspace


def _quickstart_into_a_file(ws: Workspace) -> Case:
    (ws.root / "afile").write_text("x")
    return Case(["quickstart", "--output-dir", str(ws.root / "afile")], "is a file")


CASES = {
    "quickstart: --output-dir is a file": _quickstart_into_a_file,
}
