"""Bad-input cases for values out of any sane range, and other commands' odd arguments."""

from __future__ import annotations

import warnings
from collections.abc import Callable

from bad_input_table import Case, Workspace
from bad_inputs_model import CHILD, UNET_WEIGHTS, model_copy, sample_argv

HUGE = 2**70  # 1180591620717411303424: past every C integer torch and numpy take


def _train_with(setting: str, expected: str) -> Callable[[Workspace], Case]:
    """`difftrain train` on the dummy data with one `--set`."""

    def build(ws: Workspace) -> Case:
        config = ws.data_config("limits")
        return Case(["train", "--config", config, "--set", setting, *ws.out], expected)

    return build


def _quickstart_into_a_file(ws: Workspace) -> Case:
    (ws.root / "afile").write_text("x")
    return Case(["quickstart", "--output-dir", str(ws.root / "afile")], "is a file")


def _quickstart_under_a_file(ws: Workspace) -> Case:
    blocker = ws.root / "afile"
    blocker.write_text("x")
    return Case(
        ["quickstart", "--output-dir", str(blocker / "sub" / "quick")],
        f"{blocker} is a file, not a folder; choose a folder",
    )


def _sample_unet_torchscript_bin(ws: Workspace) -> Case:
    """A unet whose only weights are a pickle-format .bin that torch warns about as it fails:
    a TorchScript archive. In a child process, so torch's warning would reach stderr."""
    import torch

    model = model_copy(ws)
    (model / UNET_WEIGHTS).unlink()
    weights = model / "unet" / "diffusion_pytorch_model.bin"
    with warnings.catch_warnings():  # torch.jit is deprecated: it still makes such files
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(weights))
    return Case(
        sample_argv(ws, model=model),
        f"--model: could not load {model}: Unable to load weights from checkpoint file",
        # Python's default filters (a user's terminal), whatever this test run's are.
        env={**CHILD, "PYTHONWARNINGS": "default::UserWarning"},
    )


CASES = {
    "quickstart: --output-dir is a file": _quickstart_into_a_file,
    "quickstart: --output-dir under a file": _quickstart_under_a_file,
    "limits: huge batch size": _train_with(
        f"train.batch_size={HUGE}", f"train.batch_size: must be at most 2147483647, got {HUGE}"
    ),
    "limits: huge resolution": _train_with(
        f"data.resolution={2**64}", f"data.resolution: must be at most 8192, got {2**64}"
    ),
    "limits: resolution just past 8192": _train_with(
        "data.resolution=8200", "data.resolution: must be at most 8192, got 8200"
    ),
    "limits: huge gradient accumulation": _train_with(
        f"train.gradient_accumulation_steps={HUGE}",
        f"train.gradient_accumulation_steps: must be at most 2147483647, got {HUGE}",
    ),
    "limits: huge validation steps": _train_with(
        f"validation.num_inference_steps={HUGE}",
        f"validation.num_inference_steps: must be at most 1000, got {HUGE}",
    ),
    "limits: validation steps just past 1000": _train_with(
        "validation.num_inference_steps=1001",
        "validation.num_inference_steps: must be at most 1000, got 1001",
    ),
    "sample: unet weights a TorchScript .bin": _sample_unet_torchscript_bin,
}
