"""Keep third-party chatter off the terminal, so our own lines (and errors) stand out.

Progress bars of model loading and advisory warnings from diffusers / transformers /
huggingface_hub say nothing a difftrain user can act on. Users who want them back set
DIFFUSERS_VERBOSITY / TRANSFORMERS_VERBOSITY / HF_HUB_DISABLE_PROGRESS_BARS themselves:
we only fill in defaults.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings


def quiet_third_party(*, libraries_loaded_soon: bool) -> None:
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # diffusers passes an argument huggingface_hub deprecated; nothing for a user to fix.
    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
    # bitsandbytes (imported by peft and diffusers when installed) warns on import about
    # 4-bit CPU kernels difftrain never uses: one stray line in every run. Since 0.50 it also
    # asks the `kernels` package (a transformers dependency) for those kernels on CPUs with
    # AVX512-BF16, which logs a warning of its own when the Hub is offline.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("kernels").setLevel(logging.ERROR)
    if not libraries_loaded_soon:
        return
    with interrupts_held():
        # The libraries a run needs, imported with Ctrl-C held back (see interrupts_held).
        import accelerate  # noqa: F401
        import diffusers  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
        from diffusers.utils import logging as diffusers_logging
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as transformers_logging

    if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
        # The variables above only count when a library is first imported, and diffusers'
        # own bars ("Loading pipeline components") ignore them: switch every bar off now.
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
        disable_progress_bars()


@contextlib.contextmanager
def interrupts_held():
    """Ctrl-C inside the block is answered (as a KeyboardInterrupt) when the block is done.

    A KeyboardInterrupt in the middle of an extension module's initialisation can leave it
    half-loaded: numpy then refuses to load again ("cannot load module more than once"), and
    an interrupt raised inside a pybind11 callback aborts the process. Imports take a few
    seconds, so holding the signal that long costs nothing.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


@contextlib.contextmanager
def diffusers_logs_silenced():
    """diffusers logs a loading failure before raising it; the raised error is reported, once.

    Without this the one-line error would come with the library's own multi-line copy. The
    libraries' Python warnings are dropped too, here only: torch warns on its way to failing
    (a TorchScript archive saved as a unet's .bin), and a warning before the one error line
    says nothing the error does not.
    """
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        diffusers_logging.set_verbosity(level)
