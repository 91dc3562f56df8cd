"""Markdown and text helpers shared by the report's blocks: tables, code fences, trimming."""

from __future__ import annotations

import re

NOT_FOUND = "not found"
MAX_LISTED = 50  # distinct warnings / NaN places / smoke folders listed before "... more"


def cell(value: object) -> str:
    """A value safe inside a markdown table cell."""
    text = " ".join(str(value).split())
    return text.replace("|", "\\|") or " "


def table(header: tuple[str, ...], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def trim(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def code_block(text: str) -> str:
    # A fence longer than any backtick run inside, so a captured log cannot end it early.
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text.rstrip()}\n{fence}"


def plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def human_size(size: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)
