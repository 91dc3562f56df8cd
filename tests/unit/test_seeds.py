"""Seeds derived from their parts: deterministic, in range, and distinct for distinct parts."""

from __future__ import annotations

import torch

from difftrain.seeds import SEED_BITS, derive_seed, generator
from difftrain.training.loss import draw_for_samples
from difftrain.training.objective import DdpmObjective, FlowObjective, LossSettings


def test_same_parts_same_seed_and_other_parts_other_seeds() -> None:
    assert derive_seed(0, "sample", 8) == derive_seed(0, "sample", 8)
    seeds = {
        derive_seed(*parts)
        for parts in [(0, "sample", 8), (0, "sample", 12), (1, "sample", 8), (0, "noise", 8),
                      (1, 23), (12, 3), ("1", 23)]
    }  # fmt: skip
    assert len(seeds) == 7


def test_extreme_parts_stay_in_range() -> None:
    # The old arithmetic ((seed * 1_000_003 + index) * 10_007 + t) overflowed int64 here.
    for parts in [(2**32 - 1, "validation-loss", 10**12, 999), (2**64, -5), ()]:
        seed = derive_seed(*parts)
        assert 0 <= seed < 2**SEED_BITS
        torch.randn(2, generator=generator(*parts))


def test_validation_loss_takes_the_largest_seed(tmp_path, dummy_data_dir, tiny_model_dir) -> None:
    from difftrain.config import config_from_dict
    from difftrain.training.trainer import train

    cfg = config_from_dict({
        "data": {"train_dir": str(dummy_data_dir), "resolution": 64},
        "train": {"output_dir": str(tmp_path / "o"), "max_steps": 1},
        "checkpointing": {"every_steps": 0},
        "validation": {"seed": 2**32 - 1, "loss_every_steps": 1, "loss_dir": str(dummy_data_dir)},
    })  # fmt: skip
    train(cfg)


def test_a_sample_draws_the_same_in_any_batch() -> None:
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    settings = LossSettings(prediction_type="epsilon", seed=3, noise_offset=0.1)
    for objective in (
        DdpmObjective(DDPMScheduler(), settings, torch.device("cpu")),
        FlowObjective(FlowMatchEulerDiscreteScheduler(shift=3.0), settings, torch.device("cpu")),
    ):
        _check_same_draws_in_any_batch(objective)


def _check_same_draws_in_any_batch(objective) -> None:
    together = draw_for_samples([4, 5, 6, 7], (4, 8, 8), objective)
    split = [draw_for_samples(p, (4, 8, 8), objective) for p in ([4, 5], [6, 7])]
    for name in ("latent_eps", "noise", "model_noise", "timesteps"):
        joined = torch.cat([getattr(part, name) for part in split])
        assert torch.equal(getattr(together, name), joined), name
    assert not torch.equal(together.noise[0], together.noise[1])
