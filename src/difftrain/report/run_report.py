"""`difftrain report RUN_DIR`: a training run as one HTML page a person reads.

    difftrain report runs/x      # -> runs/x/report.html, runs/x/report/{loss,lr,...}.png

The page (html_page) holds the curves drawn from metrics.jsonl (plots), every validation grid
in step order, the data (data_manifest.json, buckets.json, skipped_images.txt), the
checkpoints, the wall time (timings.json), the resolved config and env.json. It embeds its
images, so the single file reads offline; the plots are also written as files for the model
card, whose "Training report" section (card_section) links them.

Everything is checked before anything is written: a missing folder, one without the
marker training writes (run_folder.RUN_MARKER), an input or output that is a symbolic link,
unreadable metrics, matplotlib absent or a model card with broken markers is one line, and
the folder is left as it was (no lock file either: see `release`). Training never renders
these plots (matplotlib would cost start-up and saving time); a run's report is made
afterwards, or at any time during the run.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from difftrain.errors import UserError
from difftrain.io import atomic_write_bytes, atomic_write_text
from difftrain.report.card_section import CARD_NAME, REPORT_NAME, card_text, with_report_section
from difftrain.report.html_page import render_page
from difftrain.report.plots import PLOTS_FOLDER, Plot, draw_plots
from difftrain.report.run_facts import read_run, refuse_links
from difftrain.training.output_lock import LOCK_FILE, OutputLock


@dataclass
class RunReport:
    html: Path
    plots: list[Path]
    card: Path | None  # the model card that links the report, when it was updated
    card_note: str  # what happened to the card, in words


def check_outputs(run_dir: Path, plots: list[Plot]) -> None:
    """Refuse, before anything is written, outputs that are links (the report would write
    or delete through them) or of the wrong kind (a folder named report.html)."""
    files = (REPORT_NAME, *(plot.link for plot in plots))
    refuse_links(run_dir, (REPORT_NAME, CARD_NAME, LOCK_FILE, PLOTS_FOLDER, *files))
    wrong = [name for name in files if (run_dir / name).exists() and not (run_dir / name).is_file()]
    if (run_dir / PLOTS_FOLDER).exists() and not (run_dir / PLOTS_FOLDER).is_dir():
        wrong.insert(0, PLOTS_FOLDER)
    if wrong:
        kind = "folder" if wrong[0] == PLOTS_FOLDER else "file"
        raise UserError(
            f"RUN_DIR {run_dir}: {wrong[0]} is not a {kind}, and the report writes one there; "
            "move it aside"
        )


def write_plots(run_dir: Path, plots: list[Plot]) -> list[Path]:
    folder = run_dir / PLOTS_FOLDER
    if any(plot.png is not None for plot in plots):
        folder.mkdir(exist_ok=True)
    written = []
    for plot in plots:
        path = run_dir / plot.link
        if plot.png is None:
            # A plot an earlier report drew (before a restart from scratch) must not linger.
            path.unlink(missing_ok=True)
            continue
        atomic_write_bytes(path, plot.png)
        written.append(path)
    return written


def try_lock(run_dir: Path) -> OutputLock | None:
    """The run folder's lock, or None while a training run holds it (the card is then left
    alone: the trainer rewrites it when the run ends)."""
    try:
        return OutputLock(run_dir).acquire()
    except UserError:
        return None  # held, or the folder is read-only: the first write below says so


def release(lock: OutputLock | None, created: bool) -> None:
    """Drop the lock; and its file when this report made it. Training leaves its lock file
    (a normal part of a run folder: see output_lock), so one that was there stays; in a
    folder without one (a copied run) the report leaves none. The file goes while still
    locked, so no process can lock it between our last write and its removal."""
    if lock is None:
        return
    if created:
        with contextlib.suppress(OSError):  # Windows cannot remove an open file: it stays
            lock.path.unlink()
    lock.release()


def write_run_report(run_dir: Path) -> RunReport:
    """Write RUN_DIR/report.html, the plot files and the card's section; return what was
    written. Raises UserError (nothing written) for the refusals the module docstring lists."""
    run_dir = Path(run_dir)
    facts = read_run(run_dir)
    plots = draw_plots(facts.metrics)
    check_outputs(run_dir, plots)
    card = card_text(run_dir)
    page = render_page(facts, plots)
    html, card_path = run_dir / REPORT_NAME, run_dir / CARD_NAME
    lock_file_existed = os.path.lexists(run_dir / LOCK_FILE)
    lock = try_lock(run_dir)
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
        release(lock, created=not lock_file_existed)
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
