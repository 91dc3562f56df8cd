"""Loss-trace regression: the first 20 losses of a fixed CPU run of each tiny builtin family,
checked in under tests/data/loss_traces/, so a change that silently alters the numerics (a
default, the noise or timestep draw, a loss weighting, the data order) fails here.

    pytest tests/unit/test_loss_traces.py -q
    python tests/unit/test_loss_traces.py --update      # regenerate, on purpose, then commit

Regenerate only for a change meant to alter training, and say so in the commit message.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from test_families import FAMILIES, family_config

TRACES = Path(__file__).resolve().parents[1] / "data" / "loss_traces"
STEPS = 20
RELATIVE_TOLERANCE = 1e-4
"""Float32 CPU kernels round differently across instruction sets (AVX2, AVX-512) in the last
bits; that stays far below 1e-4 over 20 steps, while any change to the maths moves a loss by
1e-3 or more."""


def trace_config(family: str, output_dir: Path, data_dir: Path):
    return family_config(
        family,
        output_dir,
        data_dir,
        train={"max_steps": STEPS, "seed": 1234, "lr_scheduler": "cosine", "lr_warmup_steps": 2},
        data={"caption_dropout": 0.1},
    )


def run_trace(family: str, output_dir: Path, data_dir: Path) -> list[float]:
    from difftrain.training.trainer import train

    return train(trace_config(family, output_dir, data_dir)).losses


@pytest.mark.parametrize("family", FAMILIES)
def test_the_first_losses_are_the_checked_in_ones(
    family: str, tmp_path: Path, dummy_data_dir: Path, builtin_cache: Path
) -> None:
    expected = json.loads((TRACES / f"{family}.json").read_text())["losses"]
    losses = run_trace(family, tmp_path / "out", dummy_data_dir)
    assert len(losses) == len(expected) == STEPS
    for step, (got, want) in enumerate(zip(losses, expected, strict=True), start=1):
        assert got == pytest.approx(want, rel=RELATIVE_TOLERANCE), (
            f"{family} step {step}: loss {got!r}, trace {want!r}; if the change is meant to "
            "alter training, regenerate: python tests/unit/test_loss_traces.py --update"
        )


def update_traces() -> None:
    """Run every family once and write its trace (the dummy data and the builtins are built
    in a temporary folder exactly as the test's fixtures build them)."""
    import os
    import tempfile

    import torch

    from difftrain.data.dummy import make_dummy_imagefolder

    with tempfile.TemporaryDirectory() as work:
        os.environ["DIFFTRAIN_CACHE"] = str(Path(work) / "cache")
        data = Path(work) / "data"
        make_dummy_imagefolder(data, num_images=8, image_size=64)
        TRACES.mkdir(parents=True, exist_ok=True)
        for family in FAMILIES:
            losses = run_trace(family, Path(work) / family, data)
            record = {"family": family, "steps": STEPS, "torch": torch.__version__,
                      "losses": losses}  # fmt: skip
            (TRACES / f"{family}.json").write_text(json.dumps(record, indent=1) + "\n")
            print(f"wrote {TRACES / f'{family}.json'}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit(__doc__)
    sys.path.insert(0, str(Path(__file__).parent))
    update_traces()
