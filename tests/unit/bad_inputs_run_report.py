"""Bad-input cases for `difftrain report RUN_DIR` (the HTML run report).

Each case builds its run folder by hand (config.yaml, metrics.jsonl, a model card): the
refusals come before any model or plot, and nothing in the folder may change.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from bad_input_table import Case, Workspace

METRICS_LINE = '{"step": 1, "loss": 0.5, "lr": 0.001, "grad_norm": 1.0}\n'


def run_folder(ws: Workspace, metrics: str | bytes | None = METRICS_LINE) -> Path:
    run = ws.folder("run")
    (run / "config.yaml").write_text("train: {max_steps: 1}\n", encoding="utf-8")
    if isinstance(metrics, bytes):
        (run / "metrics.jsonl").write_bytes(metrics)
    elif metrics is not None:
        (run / "metrics.jsonl").write_text(metrics, encoding="utf-8")
    (run / "README.md").write_text("# run\n\nThe card.\n", encoding="utf-8")
    return run


def _missing(ws: Workspace) -> Case:
    return Case(["report", str(ws.root / "no-such-run")], "folder not found")


def _a_file(ws: Workspace) -> Case:
    path = ws.root / "run.txt"
    path.write_text("not a folder\n", encoding="utf-8")
    return Case(["report", str(path)], f"RUN_DIR {path}: not a folder")


def _not_a_run(ws: Workspace) -> Case:
    return Case(["report", str(ws.data)], "not a run folder (no metrics.jsonl and no config.yaml)")


def _a_ci_dir(ws: Workspace) -> Case:
    ci = ws.folder("_ci_tmp")
    (ci / "junit").mkdir()
    (ci / "junit" / "unit.xml").write_text("<testsuites/>", encoding="utf-8")
    return Case(["report", str(ci)], "use `difftrain report --ci-dir` for the checklist")


def _metrics_not_text(ws: Workspace) -> Case:
    run = run_folder(ws, b"\x89PNG\r\n\x1a\n\xff\xfe binary")
    return Case(["report", str(run)], "metrics.jsonl: cannot be read (not UTF-8 text)")


def _metrics_no_step(ws: Workspace) -> Case:
    run = run_folder(ws, 'not json\n{"loss": 0.5}\n[1, 2]\n')
    return Case(["report", str(run)], 'no line is a JSON object with a "step" (3 unreadable')


def _metrics_a_folder(ws: Workspace) -> Case:
    run = run_folder(ws, None)
    (run / "metrics.jsonl").mkdir()
    (run / "metrics.jsonl" / "keep.txt").write_text("x", encoding="utf-8")
    return Case(["report", str(run)], "metrics.jsonl: cannot be read (Is a directory)")


def _with_ci_dir(ws: Workspace) -> Case:
    run = run_folder(ws)
    return Case(
        ["report", str(run), "--ci-dir", str(ws.root)],
        "--ci-dir and --template fill the smoke checklist: give RUN_DIR or those options",
    )


def _broken_card_markers(ws: Workspace) -> Case:
    from difftrain.report.card_section import BEGIN

    run = run_folder(ws)
    (run / "README.md").write_text(f"# run\n\n{BEGIN}\n## Training report\n", encoding="utf-8")
    return Case(["report", str(run)], "markers of the training report section are broken")


def _no_matplotlib(ws: Workspace) -> Case:
    def hide(mp) -> None:
        mp.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` -> ImportError
        mp.setitem(sys.modules, "matplotlib.figure", None)

    run = run_folder(ws)
    return Case(["report", str(run)], "pip install matplotlib (or pip install 'difftrain[report]')",
                patch=hide)  # fmt: skip


def _cannot_write(ws: Workspace) -> Case:
    import difftrain.report.run_report as run_report

    def refuse(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied")

    run = run_folder(ws)
    return Case(
        ["report", str(run)],
        "cannot write the report (Permission denied)",
        patch=lambda mp: mp.setattr(run_report.tempfile, "mkstemp", refuse),
        may_create=("run/.difftrain.lock",),  # the folder's lock, held while writing
    )


CASES: dict[str, Callable[[Workspace], Case]] = {
    "run_report_missing_folder": _missing,
    "run_report_a_file": _a_file,
    "run_report_not_a_run_folder": _not_a_run,
    "run_report_given_a_ci_dir": _a_ci_dir,
    "run_report_metrics_not_text": _metrics_not_text,
    "run_report_metrics_without_steps": _metrics_no_step,
    "run_report_metrics_is_a_folder": _metrics_a_folder,
    "run_report_with_ci_dir_option": _with_ci_dir,
    "run_report_broken_card_markers": _broken_card_markers,
    "run_report_without_matplotlib": _no_matplotlib,
    "run_report_cannot_write": _cannot_write,
}
