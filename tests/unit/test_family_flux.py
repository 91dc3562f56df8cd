"""Flux-specific maths and options, checked against diffusers' own `FluxPipeline` functions:
2x2 latent packing and image position ids, the text conditioning, the transformer call (the
guidance input included), the resolution check, the T5 length, pipelines diffusers wrote, and
CLIP LoRA adapters the pipeline loads.

What every family shares (train, save, sample, LoRA, resume, a falling loss) is in
`test_families.py`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from safetensors.torch import load_file
from test_families import family_config

from difftrain.cli import main
from difftrain.models.families.base import FamilyOptions
from difftrain.models.families.flux import (
    Flux,
    latent_image_ids,
    pack_latents,
    unpack_latents,
)
from difftrain.models.tiny import builtin_model_path
from difftrain.training.trainer import train

SHORT_T5 = {"max_sequence_length": 16}
"""Runs that test something else use a short T5 prompt (the default 512 is slow on CPU)."""


@pytest.fixture(scope="module")
def tiny_flux(builtin_cache: Path) -> FluxPipeline:
    pipeline = FluxPipeline.from_pretrained(builtin_model_path("builtin:tiny-flux"))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def parts_of(pipeline: FluxPipeline) -> dict:
    return {name: getattr(pipeline, name) for name in (*Flux.tokenizers, *Flux.text_encoders)}


# --- packing and position ids -----------------------------------------------------------------


@pytest.mark.parametrize("height,width", [(8, 8), (4, 10)])
def test_pack_matches_diffusers_and_unpack_inverts_it(height: int, width: int) -> None:
    latents = torch.randn(2, 4, height, width)
    packed = pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 4, height, width))
    assert packed.shape == (2, height // 2 * width // 2, 16)
    assert torch.equal(unpack_latents(packed, height, width), latents)
    # diffusers' own unpacking takes pixel sizes (the VAE downsamples by 8).
    ours = unpack_latents(packed, height, width)
    assert torch.equal(ours, FluxPipeline._unpack_latents(packed, height * 8, width * 8, 8))


def test_image_ids_match_diffusers() -> None:
    ids = latent_image_ids(3, 5, "cpu", torch.float32)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32))
    assert ids.shape == (15, 3) and ids[7].tolist() == [0.0, 1.0, 2.0]


# --- conditioning and the transformer call ----------------------------------------------------


def test_encode_prompts_match_flux_pipeline_encode_prompt(tiny_flux: FluxPipeline) -> None:
    family = Flux(FamilyOptions(max_sequence_length=24))
    caption = "a red circle on a blue background"
    tokens = family.tokenize(parts_of(tiny_flux), caption)
    batch = {name: ids[None] for name, ids in tokens.items()}
    with torch.no_grad():
        ours = family.encode_prompts(parts_of(tiny_flux), batch, "cpu")
        embeds, pooled, text_ids = tiny_flux.encode_prompt(
            caption, prompt_2=None, max_sequence_length=24
        )
    assert torch.allclose(ours["prompt_embeds"], embeds)
    assert torch.allclose(ours["pooled_prompt_embeds"], pooled)
    # Text ids are the same for every sample: predict makes them (zeros, as the pipeline's).
    assert "text_ids" not in ours and not text_ids.any()


def test_max_sequence_length_sets_the_t5_token_count(tiny_flux: FluxPipeline) -> None:
    parts = parts_of(tiny_flux)
    for length, expected in ((None, 512), (40, 40)):
        family = Flux(FamilyOptions(max_sequence_length=length))
        tokens = family.tokenize(parts, "a red circle")
        assert tokens["tokens.tokenizer_2"].shape == (expected,)
        assert tokens["tokens.tokenizer"].shape == (77,)  # CLIP keeps its own length
        batch = {name: ids[None] for name, ids in tokens.items()}
        with torch.no_grad():
            conditioning = family.encode_prompts(parts, batch, "cpu")
        assert conditioning["prompt_embeds"].shape == (1, expected, 32)
        # Every conditioning tensor is per sample (batch on dim 0), so samples can be cached.
        assert all(value.shape[0] == 1 for value in conditioning.values())


def pipeline_style_prediction(transformer, noisy, timesteps, conditioning, guidance):
    """What FluxPipeline's denoising loop computes for `noisy`, with diffusers' helpers."""
    b, c, h, w = noisy.shape
    out = transformer(
        hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w),
        timestep=timesteps / 1000,
        guidance=None if guidance is None else torch.full([1], guidance).expand(b),
        pooled_projections=conditioning["pooled_prompt_embeds"],
        encoder_hidden_states=conditioning["prompt_embeds"],
        txt_ids=torch.zeros(conditioning["prompt_embeds"].shape[1], 3),
        img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", noisy.dtype),
        return_dict=False,
    )[0]
    return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)


def test_predict_is_the_pipelines_transformer_call_in_latent_layout(
    tiny_flux: FluxPipeline,
) -> None:
    torch.manual_seed(0)
    noisy = torch.randn(2, 4, 8, 6)  # not square: rows and columns must not swap
    timesteps = torch.tensor([250.0, 900.0])
    conditioning = {
        "prompt_embeds": torch.randn(2, 7, 32),
        "pooled_prompt_embeds": torch.randn(2, 32),
    }
    transformer = tiny_flux.transformer

    def both(guidance_scale: float | None, guidance: float):
        family = Flux(FamilyOptions(guidance_scale=guidance_scale))
        with torch.no_grad():
            ours = family.predict(transformer, noisy, timesteps, conditioning, {})
            return ours, pipeline_style_prediction(
                transformer, noisy, timesteps, conditioning, guidance
            )

    (default, expected_default), (low, expected_low) = both(None, 3.5), both(1.0, 1.0)
    assert default.shape == noisy.shape
    assert torch.allclose(default, expected_default, atol=1e-6)
    assert torch.allclose(low, expected_low, atol=1e-6)
    assert not torch.allclose(default, low, atol=1e-4)  # the guidance value reaches the model


def test_guidance_scale_changes_the_first_loss(
    tmp_path: Path, dummy_data_dir: Path, builtin_cache: Path
) -> None:
    def first_loss(name: str, guidance: float | None) -> float:
        cfg = family_config(
            "flux", tmp_path / name, dummy_data_dir, model=SHORT_T5,
            train={"max_steps": 1, "guidance_scale": guidance},
        )  # fmt: skip
        return train(cfg).losses[0]

    default, explicit = first_loss("default", None), first_loss("3.5", 3.5)
    low = first_loss("1", 1.0)
    assert default == explicit  # unset is 3.5, as in diffusers' Flux scripts
    assert default != low


def diffusers_flux_pipeline_without_guidance() -> FluxPipeline:
    """A tiny Flux pipeline assembled here (not by difftrain's builtin), as Flux.1-schnell
    with no guidance input."""
    tiny = Flux.build_tiny(seed=5)
    torch.manual_seed(5)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8], guidance_embeds=False,
    )  # fmt: skip
    return FluxPipeline(**{**tiny.components, "transformer": transformer})


def test_a_pipeline_saved_by_diffusers_without_guidance_embeds_trains(
    tmp_path: Path, dummy_data_dir: Path, builtin_cache: Path
) -> None:
    # Flux.1-schnell's layout: no guidance input (a guidance tensor would make the
    # transformer's embedding fail), so train.guidance_scale changes nothing.
    model = tmp_path / "schnell-like"
    diffusers_flux_pipeline_without_guidance().save_pretrained(model)
    losses = []
    for guidance in (None, 1.0):
        cfg = family_config(
            "flux", tmp_path / f"out-{guidance}", dummy_data_dir,
            model={"pretrained": str(model), **SHORT_T5},
            train={"guidance_scale": guidance},
        )  # fmt: skip
        result = train(cfg)
        assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
        losses.append(result.losses)
    assert losses[0] == losses[1]
    trained = FluxPipeline.from_pretrained(tmp_path / "out-None")
    assert not trained.transformer.config.guidance_embeds


# --- config -----------------------------------------------------------------------------------


def test_resolution_not_a_multiple_of_16_is_refused(
    tmp_path: Path, dummy_data_dir: Path, builtin_cache: Path, capsys
) -> None:
    config = tmp_path / "flux.yaml"
    config.write_text(
        f"model: {{pretrained: 'builtin:tiny-flux'}}\n"
        f"data: {{train_dir: '{dummy_data_dir}', resolution: 72}}\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    code = main(["train", "--config", str(config), "--output-dir", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("difftrain: error: data.resolution: 72")
    assert "multiple of 16" in lines[0] and "use 64 or 80" in lines[0]
    assert not out.exists()


def test_resolution_multiple_of_16_and_guidance_scale_are_accepted(
    tmp_path: Path, dummy_data_dir: Path
) -> None:
    cfg = family_config(
        "flux", tmp_path, dummy_data_dir, data={"resolution": 80}, train={"guidance_scale": 1.0}
    )
    Flux(FamilyOptions(guidance_scale=1.0)).check_config(cfg)


def test_more_t5_tokens_than_flux_pipeline_takes_is_refused(
    tmp_path: Path, dummy_data_dir: Path
) -> None:
    from difftrain.errors import UserError

    Flux().check_config(
        family_config("flux", tmp_path, dummy_data_dir, model={"max_sequence_length": 512})
    )
    cfg = family_config("flux", tmp_path, dummy_data_dir, model={"max_sequence_length": 513})
    with pytest.raises(UserError, match=r"^model\.max_sequence_length: 513 .* at most 512"):
        Flux().check_config(cfg)


def test_shard_units_are_both_kinds_of_transformer_block(tiny_flux: FluxPipeline) -> None:
    transformer = tiny_flux.transformer
    units = Flux().shard_units(transformer)
    assert units == [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    assert len(units) == 2


# --- LoRA -------------------------------------------------------------------------------------


def test_text_encoder_lora_is_clip_only_and_loads_in_flux_pipeline(
    tmp_path: Path, dummy_data_dir: Path, builtin_cache: Path
) -> None:
    out = tmp_path / "out"
    cfg = family_config(
        "flux", out, dummy_data_dir, model=SHORT_T5, train={"learning_rate": 5e-2},
        lora={"enabled": True, "rank": 4, "train_text_encoder": True},
    )  # fmt: skip
    train(cfg)
    keys = load_file(out / "pytorch_lora_weights.safetensors").keys()
    assert any(k.startswith("text_encoder.") for k in keys)
    assert any(k.startswith("transformer.") for k in keys)
    assert not any(k.startswith("text_encoder_2.") for k in keys)  # T5 takes no adapters

    pipeline = FluxPipeline.from_pretrained(builtin_model_path("builtin:tiny-flux"))
    ids = pipeline.tokenizer("a red circle", padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        before = pipeline.text_encoder(ids).pooler_output
        pipeline.load_lora_weights(str(out))
        after = pipeline.text_encoder(ids).pooler_output
    adapters = pipeline.get_list_adapters()
    assert adapters.get("text_encoder") and adapters.get("transformer")
    assert not torch.allclose(before, after, atol=1e-5)
