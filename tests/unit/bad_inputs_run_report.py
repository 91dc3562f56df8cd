"""Bad-input cases for `difftrain report RUN_DIR` (the HTML run report).

Each case builds its run folder by hand (the run marker, config.yaml, metrics.jsonl, a model
card): the refusals come before any model or plot, and nothing in the folder may change, nor
may a lock file be left in it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from bad_input_table import Case, Workspace

from difftrain.training.output_lock import LOCK_FILE
from difftrain.training.run_dir import RUN_MARKER

METRICS_LINE = '{"step": 1, "loss": 0.5, "lr": 0.001, "grad_norm": 1.0}\n'
LINK_MESSAGE = "is a symbolic link; `difftrain report` reads and writes only the run's own files"


def run_folder(
    ws: Workspace, metrics: str | bytes | None = METRICS_LINE, marker: bool = True
) -> Path:
    run = ws.folder("run")
    if marker:
        (run / RUN_MARKER).write_text('{"difftrain": "0.1.0"}\n', encoding="utf-8")
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
    return Case(["report", str(ws.data)], f"not a difftrain run folder (no {RUN_MARKER}")


def _no_marker(ws: Workspace) -> Case:
    # config.yaml, metrics.jsonl and a README.md, but no marker: not a folder training
    # claimed, so its card is not appended to, nor its report/ cleared, nor a lock left.
    run = run_folder(ws, marker=False)
    (run / "report").mkdir()
    (run / "report" / "loss.png").write_bytes(b"someone's plot")
    return Case(["report", str(run)], f"RUN_DIR {run}: not a difftrain run folder")


def _linked(name: str, target_is_folder: bool = False) -> Callable[[Workspace], Case]:
    """RUN_DIR/`name` a link to a file (or folder) outside the run: refused, and nothing is
    read through it into the page or written (or deleted) through it."""

    def build(ws: Workspace) -> Case:
        run = run_folder(ws)
        outside = ws.root / "elsewhere"
        if target_is_folder:
            outside.mkdir()
            (outside / "loss.png").write_bytes(b"not the run's")
        else:
            outside.write_text("secret: kept out of the page\n", encoding="utf-8")
        link = run / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(outside, target_is_directory=target_is_folder)
        return Case(["report", str(run)], f"RUN_DIR {run}: {name} {LINK_MESSAGE}")

    return build


def _report_html_a_folder(ws: Workspace) -> Case:
    run = run_folder(ws)
    (run / "report.html").mkdir()
    (run / "report.html" / "keep.txt").write_text("x", encoding="utf-8")
    return Case(["report", str(run)], "report.html is not a file, and the report writes one")


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
    import difftrain.io

    def refuse(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied")

    # The folder's lock is taken while writing; the case's check that no file is new makes
    # sure it is not left behind (this folder had no lock file).
    run = run_folder(ws)
    return Case(
        ["report", str(run)],
        "cannot write the report (Permission denied)",
        patch=lambda mp: mp.setattr(difftrain.io.tempfile, "mkstemp", refuse),
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
    "run_report_without_the_run_marker": _no_marker,
    "run_report_report_html_is_a_folder": _report_html_a_folder,
    **{
        f"run_report_linked_{name.strip('.').replace('/', '_').replace('.', '_')}": _linked(name)
        for name in (
            "config.yaml",
            "env.json",
            "metrics.jsonl",
            "data_manifest.json",
            "buckets.json",
            "timings.json",
            "skipped_images.txt",
            RUN_MARKER,
            "README.md",
            "report.html",
            LOCK_FILE,
            "report/loss.png",
        )
    },  # fmt: skip
    "run_report_linked_report_folder": _linked("report", target_is_folder=True),
    "run_report_linked_samples_folder": _linked("samples", target_is_folder=True),
}
