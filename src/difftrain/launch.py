"""`difftrain train --num-processes N`: start N training processes with one command.

The processes are started by torch's elastic launcher (what `torchrun` and accelerate's own
multi-GPU launcher run), in this process: one process per GPU, or, on a machine without GPUs,
CPU processes told to use the CPU (`ACCELERATE_USE_CPU`), which accelerate then trains with
the gloo backend (`accelerate launch` starts a single CPU process unless MPI is installed).
The launcher watches its processes: when one dies, it stops the others at once; a SIGINT /
SIGTERM to the launcher reaches every process as that signal (each checkpoints and stops).
"""

from __future__ import annotations

import os
import socket
import sys

from difftrain.errors import UserError


def launch_processes(num_processes: int, train_argv: list[str]) -> int:
    """Run `difftrain train TRAIN_ARGV` in `num_processes` processes; their exit code."""
    import torch
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, launch_agent

    if num_processes < 1:
        raise UserError(f"--num-processes: must be at least 1, got {num_processes}")
    if torch.cuda.is_available() and num_processes > torch.cuda.device_count():
        raise UserError(
            f"--num-processes {num_processes}: this machine has {torch.cuda.device_count()} "
            "GPU(s); use at most that many, or launch on more machines (docs/distributed.md)"
        )
    os.environ["DIFFTRAIN_LAUNCHED"] = "1"  # the workers train instead of launching again
    if not torch.cuda.is_available():
        os.environ["ACCELERATE_USE_CPU"] = "1"
        # Each process gets its share of the cores: N processes each starting one thread per
        # core would fight over them.
        os.environ.setdefault(
            "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes))
        )
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=num_processes,
        run_id="difftrain",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        max_restarts=0,  # a failed run is reported, not silently started again
        # After a signal the workers checkpoint before they exit: give a large model's
        # checkpoint time to be written before the launcher resorts to SIGKILL.
        shutdown_timeout=600,
        monitor_interval=0.2,
    )
    try:
        launch_agent(config, sys.executable, ["-m", "difftrain", "train", *train_argv])
    except ChildFailedError as exc:
        # The workers have already said why (one line from the main process).
        codes = [failure.exitcode for failure in exc.failures.values()]
        return max((code for code in codes if code > 0), default=1)
    except SignalException as exc:
        # SIGINT / SIGTERM to the launcher: it sent the same signal to every worker, and each
        # wrote a checkpoint and exited (130 / 143) before the launcher returned.
        return 128 + int(exc.sigval)
    return 0


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on now (for the rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_rank() -> int:
    """This process's global rank as the launcher set it (0 when not launched)."""
    for name in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        value = os.environ.get(name)
        if value and value.isdigit():
            return int(value)
    return 0
