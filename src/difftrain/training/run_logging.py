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
    shown = ", ".join(getattr(path, "name", str(path)) for path, _ in skipped[:5])
    more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    logger.warning(
        "skipped %d unreadable images (%s%s); all listed in %s",
        len(skipped), shown, more, output_dir / "skipped_images.txt",
    )  # fmt: skip


def report_buckets(buckets, block: int, output_dir: Path) -> None:
    """OUTPUT_DIR/buckets.json (images per bucket) and the table in the log."""
    import json

    from difftrain.io import atomic_write_text

    table = buckets.table(block)
    atomic_write_text(output_dir / "buckets.json", json.dumps(table, indent=2) + "\n")
    sizes = ", ".join(f"{name}: {count}" for name, count in table["buckets"].items())
    logger.info("aspect-ratio buckets (%d images per epoch): %s",
                table["images_per_epoch"], sizes)  # fmt: skip
    if table["unused"]:
        logger.warning(
            "buckets %s hold fewer than %d images (batch size x processes) and never train; "
            "add images or lower data.bucket_max_ratio",
            ", ".join(table["unused"]),
            block,
        )
