"""`difftrain report RUN_DIR`: a training run as one HTML page a person reads.

    difftrain report runs/x      # -> runs/x/report.html, runs/x/report/{loss,lr,...}.png

The page (html_page) holds the curves drawn from metrics.jsonl (plots), every validation grid
in step order, the data (data_manifest.json, buckets.json, skipped_images.txt), the
checkpoints, the wall time (timings.json), the resolved config and env.json. It embeds its
images, so the single file reads offline; the plots are also written as files for the model
card, whose "Training report" section (card_section) links them.

Everything is checked before anything is written: a missing or non-run folder, unreadable
metrics, matplotlib absent or a model card with broken markers is one line, and the folder
is left as it was. Training never renders these plots (matplotlib would cost start-up and
saving time); a run's report is made afterwards, or at any time during the run.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from difftrain.errors import UserError
from difftrain.io import TEMP_SUFFIX, atomic_write_text
from difftrain.report.card_section import (
    CARD_NAME,
    PLOTS_FOLDER,
    REPORT_NAME,
    card_text,
    with_report_section,
)
from difftrain.report.html_page import render_page
from difftrain.report.plots import Plot, draw_plots
from difftrain.report.run_facts import read_run


@dataclass
class RunReport:
    html: Path
    plots: list[Path]
    card: Path | None  # the model card that links the report, when it was updated
    card_note: str  # what happened to the card, in words


def write_bytes_atomically(path: Path, data: bytes) -> None:
    """As io.atomic_write_text, for bytes: a reader never sees half a PNG."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_plots(run_dir: Path, plots: list[Plot]) -> list[Path]:
    folder = run_dir / PLOTS_FOLDER
    folder.mkdir(exist_ok=True)
    written = []
    for plot in plots:
        path = folder / plot.filename
        if plot.png is None:
            # A plot an earlier report drew (before a restart from scratch) must not linger.
            path.unlink(missing_ok=True)
            continue
        write_bytes_atomically(path, plot.png)
        written.append(path)
    return written


def try_lock(run_dir: Path):
    """The run folder's lock, or None while a training run holds it (the card is then left
    alone: the trainer rewrites it when the run ends)."""
    from difftrain.training.output_lock import OutputLock

    try:
        return OutputLock(run_dir).acquire()
    except UserError:
        return None  # held, or the folder is read-only: the first write below says so


def write_run_report(run_dir: Path) -> RunReport:
    """Write RUN_DIR/report.html, the plot files and the card's section; return what was
    written. Raises UserError (nothing written) for the refusals the module docstring lists."""
    run_dir = Path(run_dir)
    facts = read_run(run_dir)
    plots = draw_plots(facts.metrics)
    card = card_text(run_dir)
    page = render_page(facts, plots)
    lock = try_lock(run_dir)
    html, card_path = run_dir / REPORT_NAME, run_dir / CARD_NAME
    try:
        written = write_plots(run_dir, plots)
        atomic_write_text(html, page)
        if card is None:
            card_note = f"no {CARD_NAME} yet (the model card is written when training ends)"
        elif lock is None:
            card_note = f"{CARD_NAME} left alone: a training run holds this folder"
        else:
            updated = with_report_section(card, plots)
            if updated != card:
                atomic_write_text(card_path, updated)
            card_note = f"linked from {card_path}"
    except OSError as exc:
        raise UserError(
            f"RUN_DIR {run_dir}: cannot write the report ({exc.strerror or exc}); check the "
            "folder's permissions and free space"
        ) from None
    finally:
        if lock is not None:
            lock.release()
    linked = card is not None and lock is not None
    return RunReport(html=html, plots=written, card=card_path if linked else None,
                     card_note=card_note)  # fmt: skip


def report_run(run_dir: Path) -> int:
    """The CLI's `difftrain report RUN_DIR`: write the report and say where it is."""
    report = write_run_report(run_dir)
    print(f"wrote {report.html}")
    if report.plots:
        print(f"  plots: {report.html.parent / PLOTS_FOLDER}/ ({len(report.plots)} files)")
    print(f"  model card: {report.card_note}")
    return 0
