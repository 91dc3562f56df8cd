"""What the processes of a multi-process run share: one verdict on the checks, reduced sums.

Work that must happen once (scanning and verifying the data, hashing a checkpoint, claiming
the output folder) runs on the main process, and its outcome, a result or the user's error,
is sent to every process. So a refused run is refused by all processes at once, with one
message, instead of the others waiting at the next barrier for a process that has left.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch

from difftrain.errors import TrainingStopped, UserError

T = TypeVar("T")


def make_accelerator(cfg):
    """The run's Accelerator (precision, accumulation, how DDP wraps the models)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # A text encoder read at its penultimate layer (SDXL, SD3) has adapters on its last layer
    # that get no gradient; DDP must be told to expect unused parameters.
    text_trains = cfg.lora.enabled and cfg.lora.train_text_encoder
    return Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=text_trains)],
    )


def release_accelerator(accelerator) -> None:
    if accelerator.num_processes > 1:
        # The process group stays up: it ends with the process (the `difftrain` command
        # leaves with os._exit, under a launcher too). Destroying it here could hang for
        # good: torch's gloo process group joins its worker threads in its destructor while
        # holding the GIL, and a worker still freeing the last collective's tensors needs
        # the GIL to do so (seen in 1 of 6 two-process runs, at the end of train()).
        return
    accelerator.end_training()
    # accelerate keeps its state process-wide and refuses a second Accelerator with other
    # settings; a later train() in this process (a notebook, the tests) may need them.
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


def run_on_main(accelerator, work: Callable[[], T]) -> T:
    """`work()` on the main process; its result (or its UserError) on every process."""
    if accelerator.num_processes == 1:
        return work()
    outcome: list[object] = [None]
    if accelerator.is_main_process:
        try:
            outcome[0] = ("result", work())
        except UserError as exc:
            outcome[0] = ("error", str(exc))
    # Process-to-process traffic inside one run (never read from a file), so pickle is fine.
    torch.distributed.broadcast_object_list(outcome, src=0)
    kind, *payload = outcome[0]
    if kind == "error":
        error = UserError(payload[0])  # the same exit code and line on every process
        error.shared = True  # said once, by the main process
        raise error
    return payload[0]


def sum_over_processes(accelerator, *values: float) -> list[float]:
    """Each value summed over all processes (float64, so the order of addition hardly shows)."""
    if accelerator.num_processes == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(tensor, reduction="sum").tolist()


def process_facts(accelerator) -> dict[str, object]:
    """How the run is spread over processes, for env.json."""
    state = accelerator.state
    return {
        "num_processes": accelerator.num_processes,
        "num_machines": _machines(),
        "distributed_type": str(accelerator.distributed_type),
        "backend": getattr(state, "backend", None),
        "device": str(accelerator.device),
    }


def _machines() -> int:
    """Launchers set WORLD_SIZE (all processes) and LOCAL_WORLD_SIZE (this machine's)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return max(1, world // max(1, local))


@contextmanager
def peers_lost_is_one_line(accelerator) -> Iterator[None]:
    """A collective that fails because another process died ends this one with one line.

    The launcher stops the remaining processes anyway; their stack traces would only bury
    the failed process's own message.
    """
    try:
        yield
    except RuntimeError as exc:
        text = str(exc)
        lost = isinstance(exc, getattr(torch.distributed, "DistBackendError", ())) or any(
            word in text for word in ("gloo", "NCCL", "Connection reset by peer", "Broken pipe")
        )
        if accelerator.num_processes == 1 or not lost:
            raise
        reason = text.strip().splitlines()[0][:200]
        raise TrainingStopped(
            f"process {accelerator.process_index} lost contact with another training process "
            f"({reason}); see that process's error, then continue with "
            "--resume-from-checkpoint latest"
        ) from None
