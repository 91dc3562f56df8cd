"""The "Training report" section of the model card (RUN_DIR/README.md), linking report.html
and its plot files.

    text = card_text(run_dir)              # None without a card; UserError for broken markers
    new = with_report_section(text, plots)

The section sits between marker comments: made again, it replaces its own earlier copy and
nothing else, so running `difftrain report` twice gives the same card, and the rest of the
card (written by training.model_card at the end of a run) is kept byte for byte.
"""

from __future__ import annotations

from pathlib import Path

from difftrain.errors import UserError
from difftrain.report.plots import Plot

CARD_NAME = "README.md"
BEGIN = "<!-- difftrain:report -->"
END = "<!-- /difftrain:report -->"
REPORT_NAME = "report.html"


def card_text(run_dir: Path) -> str | None:
    """The model card's text, or None when the run has none yet (it is written when training
    ends); a card whose markers are broken is refused before anything is written."""
    path = run_dir / CARD_NAME
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise UserError(f"{path}: cannot be read ({why}); fix or remove the model card") from None
    begins, ends = text.count(BEGIN), text.count(END)
    if (begins, ends) != (0, 0) and (
        (begins, ends) != (1, 1) or text.index(BEGIN) > text.index(END)
    ):
        raise UserError(
            f"{path}: the {BEGIN} ... {END} markers of the training report section are "
            f"broken ({begins} begin, {ends} end); delete them and run `difftrain report` again"
        )
    return text


def report_section(plots: list[Plot]) -> str:
    lines = [
        BEGIN,
        "## Training report",
        "",
        f"[{REPORT_NAME}]({REPORT_NAME}) has the training curves, every validation grid, the "
        "resolved config, the environment, the data, the checkpoints and the wall time in one "
        "file (open it in a browser). `difftrain report` wrote it and this section.",
        "",
    ]
    lines += [f"![{p.title}]({p.link})" for p in plots if p.png is not None]
    missing = [p for p in plots if p.png is None]
    if missing:
        lines += ["", *(f"- {p.title}: {p.note}" for p in missing)]
    return "\n".join([*lines, END])


def with_report_section(text: str, plots: list[Plot]) -> str:
    """`text` with the section replaced where it already is, else appended at the end."""
    section = report_section(plots)
    if BEGIN in text:
        start, end = text.index(BEGIN), text.index(END) + len(END)
        return text[:start] + section + text[end:]
    separator = "" if text.endswith("\n\n") else "\n" if text.endswith("\n") else "\n\n"
    return f"{text}{separator}{section}\n"
