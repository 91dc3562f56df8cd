"""SD3's own maths, on its tiny builtin: the conditioning diffusers' pipeline builds (CLIP
features zero-padded to the T5 width, then the T5 tokens), training without T5, the T5 prompt
length, the rectified-flow loss with SD3's timestep densities and loss weightings, the DDPM
options it refuses, and a pipeline saved by diffusers itself.

What every family does (save, LoRA, resume, falling loss) is in `test_families.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_families import family_config, sample

from difftrain.models.families.base import FamilyOptions
from difftrain.models.families.sd3 import StableDiffusion3
from difftrain.training.trainer import train

PROMPTS = ["a red circle", "a green square on a white background"]
CLIP_TOKENS = 77


@pytest.fixture(scope="module")
def pipeline(builtin_cache: Path):
    from diffusers import StableDiffusion3Pipeline

    from difftrain.models.tiny import builtin_model_path

    return StableDiffusion3Pipeline.from_pretrained(builtin_model_path("builtin:tiny-sd3"))


def encode(family: StableDiffusion3, pipeline, prompts: list[str]) -> dict:
    """The family's conditioning of `prompts`, tokenized as the data set does."""
    parts = {name: getattr(pipeline, name) for name in family.parts_to_load()}
    rows = [family.tokenize(parts, prompt) for prompt in prompts]
    batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
    with torch.no_grad():
        return family.encode_prompts(parts, batch, torch.device("cpu"))


def pipeline_encoding(pipeline, prompts: list[str], max_sequence_length: int):
    with torch.no_grad():
        embeds, _, pooled, _ = pipeline.encode_prompt(
            prompts, prompts, prompts, do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )  # fmt: skip
    return embeds, pooled


def test_conditioning_is_the_pipelines_clip_padded_then_t5(pipeline) -> None:
    family = StableDiffusion3()
    conditioning = encode(family, pipeline, PROMPTS)
    embeds, pooled = conditioning["prompt_embeds"], conditioning["pooled_prompt_embeds"]
    width = pipeline.transformer.config.joint_attention_dim
    clip_width = (
        pipeline.text_encoder.config.hidden_size + pipeline.text_encoder_2.config.hidden_size
    )
    assert clip_width < width  # so the padding is there to check
    assert embeds.shape == (2, CLIP_TOKENS + 256, width)
    assert pooled.shape == (2, pipeline.transformer.config.pooled_projection_dim)
    clip = embeds[:, :CLIP_TOKENS]
    assert torch.count_nonzero(clip[..., clip_width:]) == 0
    assert torch.count_nonzero(clip[..., :clip_width]) > 0
    assert torch.count_nonzero(embeds[:, CLIP_TOKENS:]) > 0  # the T5 tokens
    # Exactly what StableDiffusion3Pipeline conditions on for these prompts.
    expected, expected_pooled = pipeline_encoding(pipeline, PROMPTS, 256)
    torch.testing.assert_close(embeds, expected)
    torch.testing.assert_close(pooled, expected_pooled)


def test_max_sequence_length_sets_the_t5_token_count(pipeline) -> None:
    from difftrain.models.loading import model_family

    cfg = family_config("sd3", Path("unused"), Path("unused"), model={"max_sequence_length": 20})
    family = model_family(cfg.model, cfg.train)
    parts = {name: getattr(pipeline, name) for name in family.tokenizers}
    assert family.tokenize(parts, PROMPTS[0])["tokens.tokenizer_3"].shape == (20,)
    conditioning = encode(family, pipeline, PROMPTS)
    assert conditioning["prompt_embeds"].shape[1] == CLIP_TOKENS + 20
    expected, _ = pipeline_encoding(pipeline, PROMPTS, 20)
    torch.testing.assert_close(conditioning["prompt_embeds"], expected)


def test_without_t5_the_t5_part_is_zeros_as_in_the_pipeline(pipeline) -> None:
    family = StableDiffusion3(FamilyOptions(drop_t5=True, max_sequence_length=24))
    assert family.dropped_parts() == ("text_encoder_3", "tokenizer_3")
    conditioning = encode(family, pipeline, PROMPTS)
    embeds = conditioning["prompt_embeds"]
    assert embeds.shape == (2, CLIP_TOKENS + 24, pipeline.transformer.config.joint_attention_dim)
    assert torch.count_nonzero(embeds[:, CLIP_TOKENS:]) == 0
    without_t5 = type(pipeline)(**{**pipeline.components, "text_encoder_3": None})
    expected, _ = pipeline_encoding(without_t5, PROMPTS, 24)
    torch.testing.assert_close(embeds, expected)


def test_drop_t5_trains_without_loading_t5_and_saves_a_pipeline_without_it(
    tmp_path: Path, dummy_data_dir: Path, builtin_cache: Path, monkeypatch
) -> None:
    import transformers
    from diffusers import StableDiffusion3Pipeline

    import difftrain.training.trainer as trainer

    loaded, conditionings = [], []
    load_components, encode_prompts = trainer.load_components, StableDiffusion3.encode_prompts

    def load_spy(*args):
        loaded.append(load_components(*args))
        return loaded[-1]

    def encode_spy(self, parts, batch, device):
        conditionings.append(encode_prompts(self, parts, batch, device))
        return conditionings[-1]

    monkeypatch.setattr(trainer, "load_components", load_spy)
    monkeypatch.setattr(StableDiffusion3, "encode_prompts", encode_spy)

    def refuse(*args, **kwargs):
        raise AssertionError("T5 loaded")

    monkeypatch.setattr(transformers.T5EncoderModel, "from_pretrained", refuse)
    out = tmp_path / "out"
    result = train(family_config("sd3", out, dummy_data_dir, model={"drop_t5": True}))
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    parts = loaded[0].parts
    assert "text_encoder_3" not in parts and "tokenizer_3" not in parts
    assert len(conditionings) == 2
    for conditioning in conditionings:
        embeds = conditioning["prompt_embeds"]
        assert embeds.shape[1] == CLIP_TOKENS + 256
        assert torch.count_nonzero(embeds[:, CLIP_TOKENS:]) == 0
        assert torch.count_nonzero(embeds[:, :CLIP_TOKENS]) > 0
    index = json.loads((out / "model_index.json").read_text())
    assert index["text_encoder_3"] == [None, None] and index["tokenizer_3"] == [None, None]
    monkeypatch.undo()  # the saved pipeline loads with nothing patched
    # diffusers loads a null text_encoder_3 only when told to (it is not an optional part).
    saved = StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None)
    assert saved.text_encoder_3 is None and saved.tokenizer_3 is None
    images = sample(saved)
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()


def test_difftrain_sample_loads_a_pipeline_saved_without_t5(
    tmp_path: Path, pipeline, builtin_cache: Path
) -> None:
    from difftrain.sampling import load_pipeline

    without_t5 = type(pipeline)(
        **{**pipeline.components, "text_encoder_3": None, "tokenizer_3": None}
    )
    without_t5.save_pretrained(str(tmp_path / "no-t5"))
    loaded = load_pipeline(tmp_path / "no-t5", "cpu")
    assert loaded.text_encoder_3 is None


def test_flow_objective_noises_with_the_scheduler_sigma_table() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from difftrain.training.objective import FlowObjective, LossSettings

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    objective = FlowObjective(scheduler, LossSettings(prediction_type="flow"), torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=generator)
    eps = torch.randn(3, 4, 8, 8, generator=generator)
    indices = torch.tensor([0, 500, 999])
    noised = objective.noised(x, eps, eps, indices)
    # SD3's shifted sigmas: s' = shift * s / (1 + (shift - 1) * s), s = 1 - index / 1000.
    s = 1 - indices.float() / 1000
    sigma = (3 * s / (1 + 2 * s)).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(noised.model_input, (1 - sigma) * x + sigma * eps)
    torch.testing.assert_close(noised.target, eps - x)
    torch.testing.assert_close(noised.timesteps, sigma.flatten() * 1000, rtol=1e-4, atol=1e-3)
    assert noised.weights is None
    # And as diffusers' scheduler noises a sample at those timesteps.
    expected = scheduler.scale_noise(x, noised.timesteps, eps)
    torch.testing.assert_close(noised.model_input, expected)


def two_step_loss(tmp_path: Path, data: Path, name: str, **train_options) -> list[float]:
    cfg = family_config("sd3", tmp_path / name, data, train={"max_steps": 2, **train_options})
    return train(cfg).losses


@pytest.fixture(scope="module")
def default_losses(tmp_path_factory, dummy_data_dir: Path, builtin_cache: Path) -> list[float]:
    return two_step_loss(tmp_path_factory.mktemp("sd3-default"), dummy_data_dir, "out")


@pytest.mark.parametrize(
    "options",
    [
        {"timestep_sampling": "mode"},
        {"timestep_sampling": "uniform"},
        {"timestep_sampling": "logit_normal", "logit_mean": 1.0},
        {"loss_weighting": "cosmap"},
        {"loss_weighting": "sigma_sqrt"},
    ],
    ids=["mode", "uniform", "logit_normal-mean-1", "cosmap", "sigma_sqrt"],
)
def test_timestep_sampling_and_loss_weighting_change_the_loss(
    options: dict, default_losses: list[float], tmp_path: Path, dummy_data_dir: Path
) -> None:
    losses = two_step_loss(tmp_path, dummy_data_dir, "out", **options)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[0] != pytest.approx(default_losses[0], rel=1e-6)


def test_logit_normal_is_the_default(
    default_losses: list[float], tmp_path: Path, dummy_data_dir: Path
) -> None:
    assert two_step_loss(tmp_path, dummy_data_dir, "out", timestep_sampling="logit_normal") == (
        default_losses
    )


@pytest.mark.parametrize(
    ("option", "value"), [("snr_gamma", 5), ("prediction_type", "v_prediction")]
)
def test_ddpm_options_are_refused_with_one_line(
    option: str, value, tmp_path: Path, dummy_data_dir: Path, builtin_cache: Path, capsys
) -> None:
    from difftrain.cli import main

    config = tmp_path / "config.yaml"
    config.write_text(
        f"model: {{pretrained: 'builtin:tiny-sd3'}}\n"
        f"data: {{train_dir: '{dummy_data_dir}', resolution: 64}}\n"
        f"train: {{output_dir: '{tmp_path / 'out'}', max_steps: 1, {option}: {value}}}\n"
    )
    code = main(["train", "--config", str(config)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("difftrain: error: "), lines
    assert f"train.{option}" in lines[0] and "sd3" in lines[0]
    assert not (tmp_path / "out" / "model_index.json").exists()


def test_a_resolution_the_patches_do_not_tile_is_refused(
    tmp_path: Path, dummy_data_dir: Path, builtin_cache: Path
) -> None:
    from difftrain.errors import UserError

    cfg = family_config("sd3", tmp_path / "out", dummy_data_dir, data={"resolution": 72})
    with pytest.raises(UserError, match="data.resolution: 72 is not a multiple of 16"):
        StableDiffusion3().check_config(cfg)


def test_a_pipeline_saved_by_diffusers_trains(tmp_path: Path, dummy_data_dir: Path) -> None:
    """A layout other than the builtin's (diffusers' own test sizes: patch 1, CLIPs as wide as
    T5, so the padding is none), written by `save_pretrained` alone."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    from difftrain.models.families import tiny_parts
    from difftrain.models.t5_tokenizer import build_t5_tokenizer

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=1,
        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
        joint_attention_dim=64, pooled_projection_dim=64, pos_embed_max_size=16,
    )  # fmt: skip
    tokenizer, tokenizer_2 = tiny_parts.clip_tokenizer(), tiny_parts.clip_tokenizer()
    tokenizer_3 = build_t5_tokenizer()
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_parts.vae(1, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=tiny_parts.clip_text_encoder(tokenizer, 2, projection=True),
        tokenizer=tokenizer,
        text_encoder_2=tiny_parts.clip_text_encoder(tokenizer_2, 3, projection=True),
        tokenizer_2=tokenizer_2,
        text_encoder_3=tiny_parts.t5_encoder(tokenizer_3, 4, d_model=64),
        tokenizer_3=tokenizer_3,
    )
    source = tmp_path / "sd3-by-diffusers"
    pipeline.save_pretrained(str(source))
    cfg = family_config(
        "sd3", tmp_path / "out", dummy_data_dir, model={"pretrained": str(source)},
        train={"max_steps": 2},
    )  # fmt: skip
    result = train(cfg)
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    saved = StableDiffusion3Pipeline.from_pretrained(tmp_path / "out")
    images = sample(saved)
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()


def test_the_shipped_sd3_lora_config_trains_on_the_tiny_sd3(
    tmp_path: Path, dummy_data_dir: Path, builtin_cache: Path
) -> None:
    """configs/sd3_lora.yaml as shipped passes SD3's checks; scaled down to the builtin, its
    LoRA targets (both attention streams) exist in an SD3 transformer and train."""
    from safetensors.torch import load_file

    from difftrain.config import load_config

    path = Path(__file__).resolve().parents[2] / "configs" / "sd3_lora.yaml"
    shipped = load_config(path)
    assert shipped.model.pretrained == "stabilityai/stable-diffusion-3.5-medium"
    assert shipped.train.timestep_sampling == "logit_normal"
    StableDiffusion3().check_config(shipped)
    cfg = load_config(
        path,
        [
            "model.pretrained=builtin:tiny-sd3", f"data.train_dir={dummy_data_dir}",
            "data.resolution=64", f"train.output_dir={tmp_path / 'out'}", "train.max_steps=2",
            "train.mixed_precision='no'", "train.gradient_accumulation_steps=1",
            "validation.every_steps=0",
        ],
    )  # fmt: skip
    assert train(cfg).steps == 2
    keys = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors").keys()
    assert any(".add_q_proj." in key for key in keys) and any(".to_q." in key for key in keys)
