"""An exclusive lock on a run's output folder, held for the whole run.

Two runs writing into one folder delete each other's partial checkpoints and interleave
`metrics.jsonl`. The lock is an OS file lock (`flock`) on `OUTPUT_DIR/.difftrain.lock`, so
the OS releases it when the holder dies, however it dies: a killed run never leaves a stale
lock behind. The file holds the holder's process id, for the message the second run prints.
The file itself stays (removing it would let a third process lock a new file while a second
still waits on the old one).
"""

from __future__ import annotations

import os
from pathlib import Path

from difftrain.errors import UserError

LOCK_FILE = ".difftrain.lock"


class OutputLock:
    """Held from `acquire` until `release` (or the process's end)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / LOCK_FILE
        self._handle = None

    def acquire(self) -> OutputLock:
        if self._handle is not None:
            return self  # already ours (`with claim_output_dir(...)` enters a held lock)
        try:
            # O_NOFOLLOW: a link planted under the lock's name must not make us write elsewhere.
            flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
            handle = open(os.open(self.path, flags, 0o644), "r+", encoding="utf-8")
        except OSError as exc:
            raise UserError(
                f"--output-dir {self.folder}: cannot write there ({exc.strerror or exc}); choose "
                "a folder you can write to"
            ) from None
        if not _try_lock(handle):
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise UserError(
                f"--output-dir {self.folder} is in use by process {holder} (another difftrain "
                "run); wait for it to finish, or choose another --output-dir"
            )
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the descriptor drops the lock
            self._handle = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


def _try_lock(handle) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
