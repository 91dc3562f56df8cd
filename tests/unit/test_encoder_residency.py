"""With both caches on, the VAE and text encoders leave memory while the cache answers for
them and come back for what needs them: the run computes exactly what it computes with them
kept loaded."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_families import family_config

from difftrain.training import trainer
from difftrain.training.metrics import read_metrics
from difftrain.training.trainer import train

CACHED = {"center_crop": True, "random_flip": False, "cache_latents": True,
          "cache_text_embeddings": True}  # fmt: skip


def run(tmp_path: Path, name: str, data: Path, cache: Path, family: str = "sd"):
    cfg = family_config(
        family, tmp_path / name, data, data={**CACHED, "cache_dir": str(cache)},
        train={"max_steps": 6},
        validation={"prompts": ["a red circle"], "every_steps": 3, "num_inference_steps": 2,
                    "loss_every_steps": 2, "loss_dir": str(data)},
    )  # fmt: skip
    return train(cfg)


@pytest.fixture
def loaded_per_step(monkeypatch) -> list[bool]:
    """Whether the VAE was in memory during each optimizer step."""
    seen: list[bool] = []
    real = trainer.TrainingRun._optimizer_step

    def spy(self, batches):
        result = real(self, batches)
        seen.append("vae" in self.components.parts)
        return result

    monkeypatch.setattr(trainer.TrainingRun, "_optimizer_step", spy)
    return seen


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_released_encoders_change_nothing_the_run_computes(
    family: str, tmp_path: Path, dummy_data_dir: Path, builtin_cache, loaded_per_step, monkeypatch
) -> None:
    # 8 images, batch 2: the first epoch (4 steps) misses, the second reads the cache.
    cold = run(tmp_path, "cold", dummy_data_dir, tmp_path / "cache", family)
    assert loaded_per_step[:4] == [True] * 4  # every miss needs them...
    assert loaded_per_step[-1] is False  # ...and a step without one lets them go
    loaded_per_step.clear()
    warm = run(tmp_path, "warm", dummy_data_dir, tmp_path / "cache", family)
    assert loaded_per_step == [False] * 6  # never in memory for a step
    assert warm.losses == cold.losses

    # The same run with the encoders kept: the same losses, validation losses, samples, weights.
    monkeypatch.setattr(trainer, "release_encoders", lambda *args: None)
    shutil.rmtree(tmp_path / "cache")
    kept = run(tmp_path, "kept", dummy_data_dir, tmp_path / "cache", family)
    assert kept.losses == cold.losses
    for out in (cold.output_dir, warm.output_dir):
        rows, kept_rows = (
            read_metrics(out / "metrics.jsonl"),
            read_metrics(kept.output_dir / "metrics.jsonl"),
        )
        assert [r.get("val_loss") for r in rows] == [r.get("val_loss") for r in kept_rows]
        assert (out / "samples" / "step-6.png").read_bytes() == (
            kept.output_dir / "samples" / "step-6.png"
        ).read_bytes()
        weights = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
        kept_weights = load_file(kept.output_dir / "unet" / "diffusion_pytorch_model.safetensors")
        assert all(torch.equal(weights[k], kept_weights[k]) for k in weights)


def test_encoders_stay_when_a_cache_is_off(
    tmp_path: Path, dummy_data_dir: Path, builtin_cache, loaded_per_step, monkeypatch
) -> None:
    from difftrain.training import encoder_residency

    released = []
    monkeypatch.setattr(
        encoder_residency.EncoderResidency, "release", lambda self: released.append(True)
    )
    cfg = family_config(
        "sd", tmp_path / "latents-only", dummy_data_dir,
        data={**CACHED, "cache_text_embeddings": False, "cache_dir": str(tmp_path / "c")},
    )  # fmt: skip
    train(cfg)
    assert released == [] and loaded_per_step == [True, True]
