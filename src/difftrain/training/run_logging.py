"""Where a run's log lines go: stderr and (main process) `OUTPUT_DIR/logs/train.log`."""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger("difftrain")


def attach_log_handlers(
    path: Path, main_process: bool, *, console_steps: bool = True
) -> list[logging.Handler]:
    """Send the `difftrain` logger to stderr and (main process only) to `path`, for one run.

    Attached per run and removed after it, so each run writes to the stderr and log file of
    its own time (a notebook or a test may swap sys.stderr between runs).
    """
    root = logging.getLogger("difftrain")
    root.setLevel(logging.INFO)
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter("%(message)s"))
    if not console_steps:
        console.addFilter(lambda record: not getattr(record, "per_step", False))
    if not main_process:
        console.setLevel(logging.WARNING)  # one process tells the story; others only warn
    handlers: list[logging.Handler] = [console]
    if main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, mode="a", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handlers.append(handler)
    for handler in handlers:
        root.addHandler(handler)
    return handlers


def detach_log_handlers(handlers: list[logging.Handler]) -> None:
    for handler in handlers:
        logging.getLogger("difftrain").removeHandler(handler)
        handler.close()


def report_skipped_images(skipped: list[tuple[Path, str]], output_dir: Path) -> None:
    if not skipped:
        return
    lines = "".join(f"{path}\t{reason}\n" for path, reason in skipped)
    (output_dir / "skipped_images.txt").write_text(lines, encoding="utf-8")
    shown = ", ".join(path.name for path, _ in skipped[:5])
    more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    logger.warning(
        "skipped %d unreadable images (%s%s); all listed in %s",
        len(skipped), shown, more, output_dir / "skipped_images.txt",
    )  # fmt: skip
