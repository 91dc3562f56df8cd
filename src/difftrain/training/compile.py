"""`train.compile`: the denoiser's forward compiled with torch.compile, in place.

`nn.Module.compile()` compiles the module's own call and keeps the module: the same object,
the same `state_dict` keys and the same `save_pretrained` files. (`torch.compile(module)`
would wrap it in an `OptimizedModule` whose state_dict keys start with `_orig_mod.`.)

What compiling needs is checked up front (`check_compile_supported`), so a run that cannot
compile is refused with one line before it starts rather than failing in its first step.
The compile itself is lazy: it happens in the first forward and backward (the first step),
and `compile_seconds()` then says how long it took, apart from the step's own time.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import sysconfig
from pathlib import Path

import torch

from difftrain.errors import UserError

logger = logging.getLogger("difftrain")

OFF = "or set train.compile: false"

INDUCTOR_OPTIONS = {"layout_optimization": False}
"""What `compile_denoiser` sets in inductor's config. Its layout optimization (convolution
activations turned channels-last) gives wrong gradients for diffusers' UNets on the CPU with
torch 2.13: the loss matches eager, but about 60% of the weight gradients (every layer
upstream of the first up block's upsampler) are off by 30-100%; with it off they match eager
to ~1e-6. Off on every device: on CUDA it is unchecked (test_compile.py's cuda test checks)."""

# torch._dynamo's timers (torch._dynamo.utils.compilation_time_metrics) that between them
# cover one compile without counting any time twice: tracing plus the forward graph's compile
# (one entry per compiled frame), and the backward graph's compile, which AOT autograd runs
# lazily in the first backward.
_COMPILE_TIMERS = ("_compile.compile_inner", "backward._backward_impl")

_baseline: float | None = None
"""Seconds on those timers when `compile_denoiser` last compiled; None when it has not."""


def compile_denoiser(
    denoiser: torch.nn.Module, enabled: bool, *, backend: str = "inductor"
) -> torch.nn.Module:
    """The denoiser, its forward compiled in place when `enabled` (`train.compile`).

    Call it once the denoiser is on its device with LoRA and gradient checkpointing applied,
    before `accelerator.prepare`. Raises UserError if compiling cannot work here. `backend`
    is torch.compile's (tests use "eager" and "aot_eager", which need no compiler).
    """
    global _baseline
    if not enabled:
        return denoiser
    options = {}
    if backend == "inductor":
        check_compile_supported(_device_of(denoiser))
        options["options"] = dict(INDUCTOR_OPTIONS)
    _baseline = _timer_total()
    denoiser.compile(backend=backend, **options)
    return denoiser


def check_compile_supported(device: torch.device | str) -> None:
    """Raise a one-line UserError if torch.compile's default backend (inductor) cannot
    compile for `device` here; what is missing would otherwise fail the first step."""
    device_type = torch.device(device).type
    if not torch._dynamo.is_dynamo_supported():
        version = ".".join(map(str, sys.version_info[:2]))
        raise UserError(
            f"train.compile: torch {torch.__version__} has no torch.compile on Python "
            f"{version}; set train.compile: false"
        )
    if device_type == "cpu":
        if not _cpp_compiler_found():
            raise UserError(
                "train.compile: needs a C++ compiler for torch.compile on the CPU "
                f"(install g++), {OFF}"
            )
        headers = _python_include_dir()
        if not (headers / "Python.h").is_file():
            raise UserError(
                "train.compile: needs the Python headers (Python.h, not in "
                f"{headers}) for torch.compile on the CPU (install python3-dev), {OFF}"
            )
    elif device_type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise UserError(
                f"train.compile: needs Triton for torch.compile on CUDA (pip install triton), {OFF}"
            )
        # Triton builds its launcher with a C compiler: $CC, else gcc or clang.
        if not (_on_path(os.environ.get("CC")) or shutil.which("gcc") or shutil.which("clang")):
            raise UserError(
                f"train.compile: needs a C compiler for Triton (install gcc, or set CC), {OFF}"
            )


def compile_seconds() -> float | None:
    """Seconds spent compiling since `compile_denoiser` compiled (tracing, forward and
    backward graphs; later recompiles add to it); None if nothing was compiled.

    The compile happens inside the first step, so call it after step 1 and log it apart
    from that step's time. Counts every torch.compile in the process, which in a run is
    the denoiser's.
    """
    if _baseline is None:
        return None
    total = _timer_total()
    # torch._dynamo.reset() clears the timers: count from zero then.
    spent = total - _baseline if total >= _baseline else total
    return spent if spent > 0 else None


def note_compile_time(record: dict) -> None:
    """Add `compile_s` to the first step's metrics record after a compile (that step's
    step_time_s holds it), and log it, once per `compile_denoiser`."""
    global _baseline
    seconds = compile_seconds()
    if seconds is None:
        return
    _baseline = None
    record["compile_s"] = round(seconds, 3)
    logger.info("compiled the denoiser in %.1f s (in this step's step_time_s)", seconds)


def _timer_total() -> float:
    from torch._dynamo.utils import compilation_time_metrics

    return sum(sum(compilation_time_metrics.get(key, ())) for key in _COMPILE_TIMERS)


def _cpp_compiler_found() -> bool:
    """Whether one of the compilers inductor searches (`torch._inductor.config.cpp.cxx`:
    $CXX, else g++; None means "download one with conda" when asked to) is on the PATH."""
    from torch._inductor import config

    search = config.cpp.cxx
    candidates = search if isinstance(search, (list, tuple)) else (search,)
    for cxx in candidates:
        if cxx is None:
            if sys.platform == "linux" and os.environ.get("TORCH_INDUCTOR_INSTALL_GXX"):
                return True  # inductor installs gcc through conda itself
            continue
        if _on_path(cxx):
            return True
    return False


def _python_include_dir() -> Path:
    # Where inductor looks for Python.h: its CPU kernels are compiled as Python extensions.
    return Path(sysconfig.get_path("include"))


def _on_path(program: str | None) -> bool:
    return bool(program) and shutil.which(program) is not None


def _device_of(model: torch.nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")
