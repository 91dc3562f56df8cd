"""GPU smoke: 2 optimizer steps on a GPU, every artifact checked, an image generated on the GPU.

    pytest ./tests -m "slow and cuda and text2image" -v --run-slow --run-integration

The first test trains the runbook's hub model (`configs/smoke_text2image.yaml`); the second
trains the built-in tiny model, so the GPU path is proven even where the Hub is unreachable,
and checks that two deterministic runs agree. Facts go into the JUnit XML as properties, which
`difftrain report` copies into the checklist.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from difftrain.config import resolve_run_config
from difftrain.data.dummy import make_dummy_imagefolder
from difftrain.io import sha256_file
from difftrain.report import OUTPUT_ARTIFACTS as ARTIFACTS  # what the checklist lists
from difftrain.training.metrics import read_metrics
from difftrain.training.trainer import train

REPO = Path(__file__).resolve().parents[2]
SMOKE_CONFIG = REPO / "configs" / "smoke_text2image.yaml"

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.cuda, pytest.mark.text2image]


def smoke_run(tmp_path: Path, name: str, *overrides: str):
    data = make_dummy_imagefolder(tmp_path / "data" / "smoke_text2image", 4, 64)
    cfg = resolve_run_config(
        SMOKE_CONFIG, [f"data.train_dir={data}", *overrides], output_dir=str(tmp_path / name)
    )
    return train(cfg)


def check_artifacts(output_dir: Path, record_property) -> list[float]:
    for name in ARTIFACTS:
        path = output_dir / name
        assert path.is_file(), f"missing artifact {name}"
        record_property(
            f"artifact:{name}", f"{path.stat().st_size} bytes sha256={sha256_file(path)}"
        )
    env = json.loads((output_dir / "env.json").read_text())
    assert env["cuda_available"] and env["gpus"], "env.json should name the GPU"
    gpu_name = env["gpus"][0]["name"]
    assert gpu_name == torch.cuda.get_device_name(0)
    record_property("gpu", gpu_name)
    record_property("torch", env["torch"])
    record_property("cuda", env["cuda"])
    losses = [row["loss"] for row in read_metrics(output_dir / "metrics.jsonl")]
    record_property("losses", json.dumps(losses))
    assert len(losses) == 2
    assert all(isinstance(x, float) and math.isfinite(x) for x in losses), losses
    return losses


def generate_on_gpu(output_dir: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(output_dir).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cuda").manual_seed(0)
    image = pipe("a red circle", num_inference_steps=2, generator=generator).images[0]
    assert image.size == (64, 64)
    assert pipe.unet.device.type == "cuda"


@pytest.mark.hub
def test_smoke_hub_model_trains_two_steps_on_gpu(tmp_path: Path, record_property) -> None:
    result = smoke_run(tmp_path, "hub-run")
    record_property("output_dir", str(result.output_dir))
    check_artifacts(result.output_dir, record_property)
    generate_on_gpu(result.output_dir)


def test_smoke_builtin_model_is_deterministic_on_gpu(
    tmp_path: Path, builtin_cache, record_property
) -> None:
    runs = [smoke_run(tmp_path, name, "model.pretrained=builtin:tiny") for name in ("a", "b")]
    record_property("output_dir", str(runs[0].output_dir))
    losses = [check_artifacts(run.output_dir, record_property) for run in runs]
    assert losses[0] == losses[1], "two deterministic GPU runs gave different losses"
    generate_on_gpu(runs[0].output_dir)


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_smoke_every_family_trains_two_steps_on_gpu(
    family: str, tmp_path: Path, builtin_cache, record_property
) -> None:
    """The 2-step smoke on each other family's tiny built-in, in bf16, sampled on the GPU."""
    import diffusers

    from difftrain.models.families import PIPELINE_CLASSES

    result = smoke_run(
        tmp_path, family, f"model.pretrained=builtin:tiny-{family}", "train.mixed_precision=bf16"
    )
    denoiser = "unet" if family == "sdxl" else "transformer"
    for name in (f"{denoiser}/diffusion_pytorch_model.safetensors", "model_index.json", "env.json"):
        assert (result.output_dir / name).is_file(), f"missing artifact {name}"
    losses = [row["loss"] for row in read_metrics(result.output_dir / "metrics.jsonl")]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), losses
    record_property(f"{family}:losses", json.dumps(losses))
    pipeline_class = getattr(diffusers, PIPELINE_CLASSES[family])
    pipe = pipeline_class.from_pretrained(result.output_dir).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cuda").manual_seed(0)
    image = pipe(
        "a red circle", num_inference_steps=2, height=64, width=64, generator=generator
    ).images[0]
    assert image.size == (64, 64)
