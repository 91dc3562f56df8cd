"""Where a run's per-step numbers go: metrics.jsonl always, TensorBoard or W&B on request,
and a progress bar on an interactive terminal.

The trainer builds one tracker with `build_tracker(accelerator.is_main_process, ...)` and calls
`log(record)` once per optimizer step, and `log_image(tag, path, step)` for each validation
grid. Processes other than the main one get `NullTracker`, with the same methods, so the loop
never branches on "is logging on".

TensorBoard writes OUTPUT_DIR/logs/tensorboard (`tensorboard --logdir OUTPUT_DIR/logs`); W&B
writes OUTPUT_DIR/logs/wandb and follows its own variables (WANDB_MODE=offline, then
`wandb sync`). Neither prints on the console: a run on a terminal stays one progress bar.
"""

from __future__ import annotations

import importlib.util
import math
import secrets
import sys
from pathlib import Path

from difftrain.errors import UserError
from difftrain.io import atomic_write_text
from difftrain.training.metrics import MetricsLog

TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
"""`train.report_to` value -> the package it needs (`none` needs nothing)."""

WANDB_PROJECT = "difftrain"
WANDB_RUN_ID_FILE = "wandb-run-id"


def check_tracker_available(report_to: str) -> None:
    """Refuse `train.report_to` when its package is missing, before any training starts.

    Only looks the package up (no import): importing wandb or tensorboard is slow, and a user
    who fixes the config should not pay for it twice.
    """
    if report_to == "none":
        return
    if report_to not in TRACKER_PACKAGES:
        # The config schema only lets the known values through: this is a bug, not user input.
        raise ValueError(f"unknown tracker {report_to!r}")
    package = TRACKER_PACKAGES[report_to]
    if importlib.util.find_spec(package) is None:
        raise UserError(
            f"train.report_to: {report_to} needs the {package} package; "
            f"pip install {package}, or set train.report_to: none"
        )


class RunTracker:
    """The main process's tracker: metrics.jsonl, an optional backend, an optional bar."""

    def __init__(
        self,
        output_dir: Path,
        *,
        report_to: str,
        max_steps: int,
        start_step: int = 0,
        run_config: dict | None = None,
        show_progress: bool | None = None,
    ):
        check_tracker_available(report_to)
        output_dir = Path(output_dir)
        self._closed = False
        self._tensorboard = None
        self._wandb = None
        self._bar = None
        self._metrics = MetricsLog(output_dir / "metrics.jsonl")
        try:
            if report_to == "tensorboard":
                self._tensorboard = _open_tensorboard(output_dir, start_step)
            elif report_to == "wandb":
                self._wandb = _open_wandb(output_dir, run_config)
            if _wants_progress(show_progress):
                self._bar = _open_bar(max_steps, start_step)
        except BaseException:
            # A backend that fails to start must not leave metrics.jsonl (or the other
            # backend) open behind it.
            self.close()
            raise

    @property
    def shows_progress(self) -> bool:
        """True while a progress bar is on screen: per-step console lines would break it."""
        return self._bar is not None

    def log(self, record: dict[str, object]) -> None:
        """Record one step: `record["step"]` is the x axis for every backend."""
        self._metrics.log(record)
        step = record.get("step")
        scalars = _scalars(record)
        if self._tensorboard is not None and isinstance(step, int):
            for tag, value in scalars.items():
                self._tensorboard.add_scalar(tag, value, global_step=step)
        if self._wandb is not None and isinstance(step, int):
            self._wandb.log(scalars, step=step)
        if self._bar is not None and isinstance(step, int):
            _advance_bar(self._bar, step, record)

    def log_image(self, tag: str, path: Path, step: int) -> None:
        """Send the image file at `path` (a validation grid) to the backend at `step`."""
        if self._tensorboard is not None:
            import numpy as np
            from PIL import Image

            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self._tensorboard.add_image(tag, pixels, global_step=step, dataformats="HWC")
        if self._wandb is not None:
            import wandb

            # At the step of the metrics just logged: W&B merges them into one row.
            self._wandb.log({tag: wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        """Close the bar and every backend; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._metrics.close()


class NullTracker:
    """The tracker of processes other than the main one: same methods, does nothing."""

    shows_progress = False

    def log(self, record: dict[str, object]) -> None:
        pass

    def log_image(self, tag: str, path: Path, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def build_tracker(main_process: bool, **kwargs) -> RunTracker | NullTracker:
    """A `RunTracker(**kwargs)` on the main process, a `NullTracker` everywhere else."""
    return RunTracker(**kwargs) if main_process else NullTracker()


def shows_progress_bar(main_process: bool) -> bool:
    """Whether `build_tracker` will draw a progress bar (the main process, on a terminal)."""
    return main_process and _wants_progress(None)


def _wants_progress(show_progress: bool | None) -> bool:
    if show_progress is not None:
        return show_progress
    # A bar in a redirected log (CI, nohup, a GPU box's job log) is a wall of \r updates.
    stream = sys.stderr
    return stream is not None and hasattr(stream, "isatty") and stream.isatty()


def _scalars(record: dict[str, object]) -> dict[str, float]:
    """The record's numeric, finite values (bools as 0/1), without the step itself."""
    scalars = {}
    for key, value in record.items():
        if key == "step" or not isinstance(value, (int, float)):
            continue
        value = float(value)
        if math.isfinite(value):
            scalars[key] = value
    return scalars


def _open_tensorboard(output_dir: Path, start_step: int):
    from torch.utils.tensorboard import SummaryWriter

    # On resume, steps after the checkpoint are trained again: purge their old events, as
    # truncate_metrics does for metrics.jsonl, so TensorBoard shows no doubled curve.
    purge_step = start_step + 1 if start_step > 0 else None
    return SummaryWriter(str(output_dir / "logs" / "tensorboard"), purge_step=purge_step)


def _open_wandb(output_dir: Path, run_config: dict | None):
    import wandb

    return wandb.init(
        project=WANDB_PROJECT,
        dir=str(output_dir / "logs"),
        config=run_config,
        id=_wandb_run_id(output_dir),
        resume="allow",
        # No banner, sync hints or run summary on the terminal, and no capture of the run's
        # own console (its lines are in logs/train.log already): the progress bar stays one
        # line. Its own logs still go to logs/wandb/.
        settings=wandb.Settings(silent=True, console="off"),
    )


def _wandb_run_id(output_dir: Path) -> str:
    """The W&B run id of this output folder, made on first use and kept in logs/.

    `resume="allow"` only continues a run whose id it is given: without a stored id every
    resume would start a new W&B run.
    """
    path = output_dir / "logs" / WANDB_RUN_ID_FILE
    if path.is_file():
        run_id = path.read_text(encoding="utf-8").strip()
        if run_id:
            return run_id
    run_id = secrets.token_hex(4)  # W&B ids are short strings of [a-z0-9]
    atomic_write_text(path, run_id + "\n")
    return run_id


def _open_bar(max_steps: int, start_step: int):
    from tqdm import tqdm

    # `initial` makes a resumed run's bar start at its step, and tqdm's rate and time left
    # count only the steps this process ran.
    return tqdm(
        total=max_steps,
        initial=start_step,
        unit="step",
        desc="train",
        file=sys.stderr,
        dynamic_ncols=True,
    )


def _advance_bar(bar, step: int, record: dict[str, object]) -> None:
    postfix = {}
    if isinstance(record.get("loss"), (int, float)):
        postfix["loss"] = f"{record['loss']:.4g}"
    if isinstance(record.get("lr"), (int, float)):
        postfix["lr"] = f"{record['lr']:.2e}"
    bar.set_postfix(postfix, refresh=False)
    # Move to the record's step rather than by one: a record that is not a new step (a
    # validation loss at the same step) does not advance the bar.
    if step > bar.n:
        bar.update(step - bar.n)
    else:
        bar.refresh()
