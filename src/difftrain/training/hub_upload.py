"""Uploads to the Hugging Face Hub: a run's outputs when it ends, and its checkpoints.

    train: {push_to_hub: true}
    hub: {repo_id: your-name/my-model, private: true, push_checkpoints: false}

The token is huggingface_hub's own (`HF_TOKEN`, or `hf auth login`), never part of the config,
so it is in no file a run writes. `check_hub_upload` refuses a run that could not upload
before anything is trained or written.

At the end the main process uploads an allow-list of the output folder (`upload_patterns`):
the model card, config.yaml, the pipeline or the LoRA files, the last sample grid. Never the
checkpoints, logs, metrics, lock or temporary files. With `hub.push_checkpoints`, each
`checkpoint-N` goes to `checkpoints/checkpoint-N/` in the repository as it is written.

Uploads run on huggingface_hub's background worker (`HfApi.run_as_future`: one job at a time,
in order), so training does not wait for a checkpoint upload. It waits only where it must: a
checkpoint that pruning (`checkpointing.total_limit`) is about to delete is waited for, with a
bound when other processes are waiting too; the end of the run waits for every upload (on
one process in `RunOutputs.publish`; with several, `finish_uploads()` once the others have
passed the last barrier, so they never wait on it). An upload that fails never costs the
files on disk: a failed checkpoint upload is a warning, a failed final upload one error line
(exit 2; 130 / 143 on Ctrl-C / SIGTERM while waiting) with the `hf upload` command that
finishes it.
"""

from __future__ import annotations

import logging
import shlex
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import wait as wait_for
from contextlib import contextmanager
from pathlib import Path

from difftrain.errors import UserError
from difftrain.training.checkpoint import list_checkpoints

logger = logging.getLogger("difftrain")

CHECKPOINTS_IN_REPO = "checkpoints"
"""Folder of the repository that checkpoint-N folders are uploaded into."""
LORA_FILES = "pytorch_lora_weights*.safetensors"
"""Every LoRA export (diffusers, kohya) the run wrote."""
PEER_WAIT_S = 300.0
"""The longest the main process waits for an upload while other processes wait for it (in
the checkpoint's first barrier): well inside torch's shortest collective timeout (10 min)."""


class HubUploadFailed(UserError):
    """The final upload failed or was interrupted; every output is complete on disk."""


def check_hub_upload(push_to_hub: bool, hub) -> None:
    """Refuse a run that could not upload at its end, before it trains (preflight).

    `hub`: the config's HubConfig. Checks the repository id's form, offline mode and that
    a token exists; not the token's rights (that needs the network, which a run may only
    have by its end).
    """
    if not push_to_hub:
        if hub.push_checkpoints:  # a request that would silently do nothing
            raise UserError(
                "hub.push_checkpoints: true uploads checkpoints only with train.push_to_hub: "
                "true; set train.push_to_hub: true, or hub.push_checkpoints: false"
            )
        return
    if not hub.repo_id:
        raise UserError(
            "train.push_to_hub: true needs hub.repo_id (the repository to upload to, e.g. "
            "your-name/my-model); set hub.repo_id, or train.push_to_hub: false"
        )
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(hub.repo_id)
    except HFValidationError as exc:
        raise UserError(
            f"hub.repo_id: {hub.repo_id!r} is not a Hub repository id ({exc}); use "
            "your-name/model-name"
        ) from None
    if constants.is_offline_mode():
        raise UserError(
            "train.push_to_hub: HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, so nothing can "
            "be uploaded; unset it, or set train.push_to_hub: false"
        )
    try:
        token = get_token()
    except Exception as exc:  # HF_OIDC_RESOURCE set (CI) and the token exchange failed
        raise UserError(
            f"train.push_to_hub: could not get a Hugging Face token ({_reason(exc)}); check "
            "HF_OIDC_RESOURCE, or set HF_TOKEN"
        ) from None
    if token is None:
        raise UserError(
            "train.push_to_hub: no Hugging Face token found; run `hf auth login` or set "
            "HF_TOKEN (a token with write access), or set train.push_to_hub: false"
        )


def upload_patterns(output_dir: Path, *, lora: bool, last_grid: Path | None) -> list[str]:
    """What the final upload takes from `output_dir`, as `hf upload --include` patterns."""
    patterns = ["README.md", "config.yaml"]
    if lora:
        patterns.append(LORA_FILES)
    else:
        import json

        index = json.loads((output_dir / "model_index.json").read_text(encoding="utf-8"))
        patterns.append("model_index.json")
        patterns += [
            f"{name}/*"
            for name, entry in sorted(index.items())
            if isinstance(entry, list) and entry[0] is not None and (output_dir / name).is_dir()
        ]
    if last_grid is not None:
        patterns.append(Path(last_grid).relative_to(output_dir).as_posix())
    return patterns


def upload_command(
    repo_id: str, folder: Path, path_in_repo: str, include: list[str], private: bool
) -> str:
    """The `hf upload` command that uploads what the run would have (shell-quoted)."""
    words = ["hf", "upload", repo_id, str(folder), path_in_repo]
    for pattern in include:
        words += ["--include", pattern]
    words.append("--private" if private else "--no-private")
    return shlex.join(words)


class HubUploads:
    """The main process's uploads to `hub.repo_id`, queued on one background worker."""

    def __init__(self, hub, output_dir: Path, *, peers_wait: bool):
        """`hub`: the config's HubConfig; `peers_wait`: other processes wait at the next
        barrier while this one waits for an upload (bound those waits)."""
        from huggingface_hub import HfApi

        self.api = HfApi()
        self.repo_id = hub.repo_id
        self.private = hub.private
        self.push_checkpoints = hub.push_checkpoints
        self.output_dir = Path(output_dir)
        self._wait_bound = PEER_WAIT_S if peers_wait else None
        self._repo_url: str | None = None  # set by the worker once the repo exists
        self._checkpoints: dict[Path, Future] = {}
        self._total_limit: int | None = None
        """checkpointing.total_limit, as `before_checkpoint` last heard it."""
        self._final: tuple[Future, list[str]] | None = None

    # --- the jobs (run on huggingface_hub's worker thread, one at a time) ----------------

    def _ensure_repo(self) -> None:
        if self._repo_url is None:
            url = self.api.create_repo(self.repo_id, private=self.private, exist_ok=True)
            self._repo_url = str(url)

    def _upload(self, folder: Path, path_in_repo: str, include: list[str] | None, message: str):
        self._ensure_repo()
        return self.api.upload_folder(
            repo_id=self.repo_id,
            folder_path=folder,
            path_in_repo=path_in_repo,
            allow_patterns=include,
            commit_message=message,
        )

    # --- queueing and waiting (main thread) ---------------------------------------------

    def push_checkpoint(self, folder: Path) -> None:
        """Queue `checkpoint-N` for `checkpoints/checkpoint-N/` (with hub.push_checkpoints)."""
        if not self.push_checkpoints:
            return
        folder = Path(folder)
        name = f"{CHECKPOINTS_IN_REPO}/{folder.name}"
        future = self.api.run_as_future(
            self._upload, folder, name, None, f"difftrain: {folder.name}"
        )
        future.add_done_callback(lambda done: self._checkpoint_done(folder, done))
        self._checkpoints = {k: f for k, f in self._checkpoints.items() if not f.done()}
        self._checkpoints[folder] = future

    def _checkpoint_done(self, folder: Path, future: Future) -> None:
        exc = future.exception()
        if exc is None:
            logger.info("uploaded %s to %s/%s", folder.name, self.repo_id, CHECKPOINTS_IN_REPO)
            return
        command = upload_command(
            self.repo_id, folder, f"{CHECKPOINTS_IN_REPO}/{folder.name}", [], self.private
        )
        pruned = (
            " before checkpointing.total_limit prunes it (raise the limit to keep it)"
            if self._total_limit is not None else ""
        )  # fmt: skip
        logger.warning(
            "could not upload %s to the Hub (%s); training goes on, the checkpoint is on "
            "disk: upload it later with `%s`%s", folder.name, _reason(exc), command, pruned,
        )  # fmt: skip

    def before_checkpoint(self, total_limit: int | None) -> None:
        """Before a checkpoint is written: wait for the uploads of the checkpoints whose
        pruning (`checkpointing.total_limit`) follows it; they would vanish mid-upload."""
        self._total_limit = total_limit
        if total_limit is None or not self._checkpoints:
            return
        existing = [path for _, path in list_checkpoints(self.output_dir)]
        doomed = existing[: max(0, len(existing) + 1 - total_limit)]
        for folder in doomed:
            future = self._checkpoints.get(folder)
            if future is None or future.done():
                continue
            logger.info("waiting for the upload of %s before it is pruned", folder.name)
            # Not future.result(timeout): an upload that failed with a TimeoutError of its
            # own would read as one still running. A failure is reported by _checkpoint_done.
            if not wait_for([future], timeout=self._wait_bound).done:
                logger.warning(
                    "%s is still uploading after %g s and is pruned now "
                    "(checkpointing.total_limit); its upload will fail: raise the limit, or "
                    "checkpoint less often", folder.name, self._wait_bound,
                )  # fmt: skip

    def push_outputs(self, include: list[str], steps: int) -> None:
        """Queue the final upload of `include` (after every checkpoint upload); `wait()`
        reports how it went."""
        future = self.api.run_as_future(
            self._upload, self.output_dir, ".", include, f"difftrain: trained {steps} steps"
        )
        self._final = (future, include)

    def wait(self) -> None:
        """Wait for every queued upload; raise HubUploadFailed when the final one failed.

        A Ctrl-C (or SIGTERM) while waiting stops the wait: the outputs are complete, and the
        error line says how to upload them.
        """
        pending = list(self._checkpoints.values())
        if self._final is not None:
            pending.append(self._final[0])
        with _signals_end_the_wait() as interrupted:
            for future in pending:
                # In short waits, so that a signal is answered (failures: _checkpoint_done
                # for checkpoints, below for the final upload).
                while not interrupted and not wait_for([future], timeout=0.2).done:
                    pass
                if interrupted:
                    break
        self._checkpoints.clear()
        final, self._final = self._final, None
        if interrupted:
            name = signal.Signals(interrupted[0]).name
            raise self._failure(final, f"interrupted by {name}", exit_code=128 + interrupted[0])
        if final is None:
            return
        future, _ = final
        if future.exception() is not None:
            raise self._failure(final, _reason(future.exception()))
        logger.info("uploaded the outputs to %s", self._repo_url or self.repo_id)

    def _failure(self, final, reason: str, exit_code: int = 2) -> HubUploadFailed:
        if final is None:  # interrupted while only checkpoints were uploading
            error = HubUploadFailed(
                f"stopped waiting for the checkpoint uploads to {self.repo_id} ({reason}); the "
                "checkpoints are on disk"
            )
        else:
            command = upload_command(self.repo_id, self.output_dir, ".", final[1], self.private)
            error = HubUploadFailed(
                f"could not upload the outputs to the Hub repository {self.repo_id} ({reason}); "
                f"they are complete in {self.output_dir}: upload them later with `{command}`"
            )
        error.exit_code = exit_code
        return error


def _reason(exc: BaseException) -> str:
    """One short line about a failed upload (huggingface_hub's messages span lines)."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(status, int):  # an HfHubHTTPError: the status and the Hub's own words
        text = f"HTTP {status}"
        detail = " ".join(str(getattr(exc, "server_message", None) or "").split())
        text += f": {detail}" if detail else ""
        if status in (401, 403):
            text += "; check that your token may write there (`hf auth whoami`)"
    else:
        text = " ".join(str(exc).split()) or type(exc).__name__
    return (text[:300] + "...") if len(text) > 300 else text


@contextmanager
def _signals_end_the_wait() -> Iterator[list[int]]:
    """SIGINT / SIGTERM while waiting for an upload are recorded and end the wait.

    The run's own handlers (which defer a signal until the outputs are complete) are put
    back afterwards; the outputs are complete by now, so only the upload is given up.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.getsignal(sig) for sig in signals}
    for sig in signals:
        signal.signal(sig, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
