"""The training state a checkpoint holds besides the model weights, in formats that run no code.

A checkpoint is input like any other: someone may hand you one. Pickle (what accelerate's
`save_state` writes for RNG states and registered objects) runs whatever code the file names
when it is loaded, so difftrain writes none:

- `training_state.json`: the format version, the stream position and counters, the LR
  schedule's state and the fp16 grad scaler's state;
- `optimizer.pt`: the optimizer's state dict, read back with `torch.load(weights_only=True)`,
  whose unpickler builds only tensors and plain containers and refuses anything else;
- `rng_state_<rank>.safetensors`: each process's torch CPU and CUDA generator states as
  tensors, with Python's and NumPy's states as JSON in its metadata.

Files a checkpoint may also hold (an attacker's `*.pkl`) are never opened.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difftrain.errors import UserError
from difftrain.io import atomic_write_json

FORMAT_VERSION = 2
"""2: pickle-free state, per-sample randomness keyed by stream position (1 was accelerate's
pickled state with per-batch randomness)."""
STATE_FILE = "training_state.json"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng_state_{rank}.safetensors"


@dataclass
class TrainingProgress:
    """What a checkpoint needs beyond model and optimizer to continue the exact run."""

    step: int = 0
    samples_seen: int = 0
    """Position in the sample stream (all processes together)."""
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0

    def state_dict(self) -> dict[str, int]:
        return {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "nonfinite_total": self.nonfinite_total,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.samples_seen = int(state["samples_seen"])
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
        self.nonfinite_total = int(state.get("nonfinite_total", 0))


@dataclass
class TrainingState:
    """The live objects whose state a checkpoint carries (the models are saved apart)."""

    progress: TrainingProgress
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    grad_scaler: Any = None
    """accelerate's GradScaler under fp16, else None."""


def save_main_state(
    folder: Path, state: TrainingState, *, num_processes: int, optimizer_state: dict | None = None
) -> None:
    """Progress, schedule, scaler and optimizer: written by the main process only.

    `optimizer_state` replaces `state.optimizer.state_dict()` (a sharded run's gathered one).
    """
    if optimizer_state is None:
        optimizer_state = state.optimizer.state_dict()
    torch.save(optimizer_state, folder / OPTIMIZER_FILE)
    atomic_write_json(
        folder / STATE_FILE,
        {
            "format_version": FORMAT_VERSION,
            "num_processes": num_processes,
            "progress": state.progress.state_dict(),
            "lr_scheduler": _plain(state.lr_scheduler.state_dict()),
            "grad_scaler": (
                _plain(state.grad_scaler.state_dict()) if state.grad_scaler is not None else None
            ),
        },
    )


def save_rng_state(folder: Path, rank: int) -> None:
    """This process's generator states (every process writes its own file)."""
    from safetensors.torch import save_file

    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{index}"] = cuda_state
    kind, keys, position, has_gauss, cached = np.random.get_state()
    metadata = {
        "python": json.dumps(_plain(random.getstate())),
        "numpy": json.dumps([kind, keys.tolist(), position, has_gauss, cached]),
    }
    save_file(tensors, str(folder / RNG_FILE.format(rank=rank)), metadata=metadata)


def checkpoint_format(folder: Path) -> int:
    """The format version a checkpoint folder was written in (1 for accelerate's pickles)."""
    try:
        facts = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        return int(facts["format_version"])
    except FileNotFoundError:
        return 1
    except (OSError, ValueError, KeyError, TypeError):
        return 0  # unreadable: not a format this difftrain knows


def check_checkpoint_format(folder: Path) -> None:
    version = checkpoint_format(folder)
    if version != FORMAT_VERSION:
        raise UserError(
            f"{folder} is a checkpoint of format {version}, and this difftrain resumes format "
            f"{FORMAT_VERSION} only (older checkpoints hold pickled state that could run code, "
            "and draw their randomness differently); start a new run, or resume it with the "
            "difftrain release that wrote it"
        )


def read_optimizer_state(folder: Path) -> dict:
    """`optimizer.pt`, unpickled by torch's weights-only loader (tensors and containers only)."""
    try:
        return torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a refused or broken file is the input's fault
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{folder / OPTIMIZER_FILE}: not an optimizer state this difftrain wrote ({reason}); "
            "resume from another checkpoint"
        ) from None


def load_training_state(
    folder: Path, state: TrainingState, *, rank: int, with_optimizer: bool = True
) -> None:
    """Restore what `save_main_state` and `save_rng_state` wrote, without unpickling.

    `with_optimizer=False` leaves the optimizer to the caller (a sharded run loads it from the
    main process, `training.sharding`).
    """
    check_checkpoint_format(folder)
    facts = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    if with_optimizer:
        state.optimizer.load_state_dict(read_optimizer_state(folder))
    state.lr_scheduler.load_state_dict(facts["lr_scheduler"])
    state.progress.load_state_dict(facts["progress"])
    if state.grad_scaler is not None and facts.get("grad_scaler"):
        state.grad_scaler.load_state_dict(facts["grad_scaler"])
    rng_file = folder / RNG_FILE.format(rank=rank)
    if rng_file.is_file():
        _load_rng_state(rng_file)


def _load_rng_state(path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        torch.set_rng_state(handle.get_tensor("torch_cpu"))
        cuda_states = [
            handle.get_tensor(f"cuda_{index}")
            for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0)
            if f"cuda_{index}" in handle.keys()
        ]
    if cuda_states:
        torch.cuda.set_rng_state_all(cuda_states)
    if "python" in metadata:
        version, internal, gauss = json.loads(metadata["python"])
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in metadata:
        kind, keys, position, has_gauss, cached = json.loads(metadata["numpy"])
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))


def _plain(value: Any) -> Any:
    """`value` as JSON data: tuples become lists; anything JSON cannot hold is a bug here."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint's JSON state")
