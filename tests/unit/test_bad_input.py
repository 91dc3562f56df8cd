"""Every bad input: exit 2, one line on stderr naming the problem, nothing on disk changed.

The table is the list of promises; its rows are in `bad_inputs_*.py`, one module per area.
"""

from __future__ import annotations

from pathlib import Path

import bad_inputs_data
import bad_inputs_hub
import bad_inputs_limits
import bad_inputs_lora_export
import bad_inputs_model
import bad_inputs_reproduce
import bad_inputs_run
import bad_inputs_run_report
import bad_inputs_single_file
import bad_inputs_sources
import pytest
from bad_input_table import make_workspace, run_case, snapshot

CASES = {
    **bad_inputs_run.CASES,
    **bad_inputs_data.CASES,
    **bad_inputs_model.CASES,
    **bad_inputs_limits.CASES,
    **bad_inputs_sources.CASES,
    **bad_inputs_hub.CASES,
    **bad_inputs_lora_export.CASES,
    **bad_inputs_reproduce.CASES,
    **bad_inputs_run_report.CASES,
    **bad_inputs_single_file.CASES,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(
    name: str, tmp_path: Path, dummy_data_dir: Path, tiny_model_dir: Path, monkeypatch, capsys
) -> None:
    workspace = make_workspace(tmp_path / "ws", dummy_data_dir, tiny_model_dir)
    case = CASES[name](workspace)
    watched = [workspace.root, *workspace.watched]
    before = snapshot(*watched)

    code, err = run_case(case, monkeypatch, capsys)

    lines = err.strip().splitlines()
    assert code == case.exit_code, err
    assert len(lines) == 1, err
    assert lines[0].startswith("difftrain: error: "), err
    assert case.expected in lines[0], err
    assert "Traceback" not in err
    after = snapshot(*watched)
    changed = [str(p) for p, digest in before.items() if after.get(p) != digest]
    assert not changed, f"changed or removed: {changed}"
    allowed = [workspace.root / prefix for prefix in case.may_create]
    new = [p for p in after if p not in before and not any(p.is_relative_to(a) for a in allowed)]
    assert not new, f"new files: {new}"


def test_every_case_module_has_cases() -> None:
    for module in (
        bad_inputs_run,
        bad_inputs_data,
        bad_inputs_model,
        bad_inputs_limits,
        bad_inputs_sources,
        bad_inputs_hub,
        bad_inputs_lora_export,
        bad_inputs_reproduce,
        bad_inputs_run_report,
        bad_inputs_single_file,
    ):
        assert module.CASES, module.__name__
