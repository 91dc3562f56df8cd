"""Atomic file and folder writes: a reader never sees half of a file that matters.

Everything is written under a temporary name in the destination's own folder (same file
system, so the final `os.replace` is atomic) and renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_SUFFIX = ".difftrain-tmp"
"""Every temporary name difftrain makes ends so: what a killed run leaves behind is told apart
from the user's own `.x.tmp` files, and only those are cleared."""
OLD_SUFFIX = ".difftrain-old"


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write beside `path` and rename into place: a reader (or a kill) never sees half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: object) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


@contextmanager
def atomic_directory(final: Path, *, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success it is renamed to `final`.

    An existing `final` is replaced only after the new one is complete, or, with
    `keep_existing`, kept (another process built the same thing first). On any error the
    temporary folder is removed and `final` is left as it was.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=TEMP_SUFFIX, dir=final.parent))
    try:
        yield tmp
        if final.exists() and keep_existing:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            replace_path(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_path(source: Path, target: Path) -> None:
    """Move `source` (a file or folder) to `target`, replacing what is there.

    A folder cannot be renamed over a non-empty one, so the old one is first renamed aside
    (`.NAME.difftrain-old`): at every moment either the old or the new `target` exists, or (killed
    between the two renames) the old one sits complete under `.NAME.old`.
    """
    if not target.is_dir():
        os.replace(source, target)
        return
    old = target.with_name(f".{target.name}{OLD_SUFFIX}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    os.replace(source, target)
    shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def storage_failure(exc: BaseException) -> str | None:
    """The reason, when `exc` is a failed write (disk full, permissions, I/O), else None.

    A full disk shows as OSError from Python, RuntimeError from torch.save
    ("PytorchStreamWriter failed ...") and SafetensorError from safetensors.
    """
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if type(exc).__name__ == "SafetensorError" or (
        isinstance(exc, RuntimeError) and "PytorchStreamWriter" in text
    ):
        return text
    return None
