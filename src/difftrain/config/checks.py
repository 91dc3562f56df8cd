"""Value checks for config fields: each returns None when a value is fine, else the reason
(the loader prefixes the dotted key), and `_checked` attaches one to a field with its default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import field
from typing import Any

Check = Callable[[Any], "str | None"]


def _positive(value: Any) -> str | None:
    return None if value is None or value > 0 else f"must be > 0, got {value}"


def _non_negative(value: Any) -> str | None:
    return None if value is None or value >= 0 else f"must be >= 0, got {value}"


def _multiple_of_8(value: Any) -> str | None:
    if value <= 0 or value % 8:
        return f"must be a positive multiple of 8 (the VAE downsamples by 8), got {value}"
    return None


def _probability(value: Any) -> str | None:
    return None if 0.0 <= value < 1.0 else f"must be in [0, 1), got {value}"


def _at_least_one(value: Any) -> str | None:
    return None if value >= 1.0 else f"must be >= 1.0, got {value}"


def _seed(value: Any) -> str | None:
    return None if 0 <= value < 2**32 else f"must be in [0, 2**32), got {value}"


def _timesteps(value: Any) -> str | None:
    if not value or min(value) < 0:
        return f"must be a non-empty list of timesteps >= 0, got {value}"
    return None


def _folder_name(value: Any) -> str | None:
    if not str(value).strip():
        return "must name a folder (an empty value would mean the current folder); pass a path"
    return None


def _required(value: Any) -> str | None:
    return "is required" if value in (None, "") else None


INT_LIMIT = 2**31 - 1
"""The largest value of any integer key (and list item) whose field sets no other `maximum`:
a count, size or step number beyond it is a typo, and torch, numpy and the data loader fail
on such numbers with errors that name no key. Seeds go up to 2**32 - 1."""


def _checked(default: Any, check: Check, *, maximum: int = INT_LIMIT) -> Any:
    """A field with a default and a check; the loader also holds its integers to `maximum`."""
    return field(default=default, metadata={"check": check, "maximum": maximum})
