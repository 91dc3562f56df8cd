"""Errors a user can cause, and how the CLI reports them.

A `UserError` is something the user can fix (a bad config key, a missing folder, a corrupt
image). The CLI prints its message as one line on stderr and exits with code 2, without a
traceback. Anything else is a bug in difftrain and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem in the user's input: reported as one line, exit code 2."""

    exit_code = 2

    def __init__(self, message: str):
        message = str(message)
        # A DataLoader worker re-raises our error as UserError("Caught UserError in DataLoader
        # worker ... Original Traceback ... UserError: <message>"): keep only the message.
        marker = f"{type(self).__name__}: "
        if "Original Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1]
        # One line, always: a multi-line message would read like a traceback.
        super().__init__(" ".join(message.split()))


class ConfigError(UserError):
    """A config key is unknown, of the wrong type, or has an impossible value."""

    def __init__(self, key: str, problem: str, source: str | None = None):
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {problem}")
        self.key = key


class StorageFull(UserError):
    """A write failed (disk full, permissions): one line, exit 2, nothing complete lost."""


class TrainingStopped(Exception):
    """Training ended early for a reason that is not the user's input (e.g. a non-finite loss).

    Reported as one line with exit code 1: the run itself failed, the input was fine.
    """

    exit_code = 1


class TrainingInterrupted(TrainingStopped):
    """SIGINT / SIGTERM: a checkpoint was written; exit 128 + the signal number (130 / 143)."""

    shared = True
    """Every process stops after the same step with it: the main process says it for all."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum
