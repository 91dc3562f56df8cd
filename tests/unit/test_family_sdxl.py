"""SDXL-specific maths and options, checked against diffusers' own `StableDiffusionXLPipeline`:
the time ids (original size, crop box, target size) of real samples, the two-encoder text
conditioning, the UNet call, pipelines diffusers wrote, a swapped VAE, and LoRA adapters on
both text encoders that the pipeline loads.

What every family shares (train, save, sample, LoRA, resume, a falling loss) is in
`test_families.py`.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline
from PIL import Image, ImageOps
from safetensors.torch import load_file
from test_families import family_config
from torch.utils.data import default_collate

from difftrain.config.schema import DataConfig
from difftrain.data.dataset import CaptionedImageDataset
from difftrain.data.folder import Example
from difftrain.data.sampler import SampleKey
from difftrain.data.transforms import preprocess_with_crop
from difftrain.models.families.sd import unet_blocks
from difftrain.models.families.sdxl import StableDiffusionXL
from difftrain.models.tiny import builtin_model_path
from difftrain.training.trainer import train

RESOLUTION = 64


@pytest.fixture(scope="module")
def tiny_sdxl(builtin_cache: Path) -> StableDiffusionXLPipeline:
    pipeline = StableDiffusionXLPipeline.from_pretrained(builtin_model_path("builtin:tiny-sdxl"))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def parts_of(pipeline) -> dict:
    names = (*StableDiffusionXL.tokenizers, *StableDiffusionXL.text_encoders)
    return {name: getattr(pipeline, name) for name in names}


def noise_image(path: Path, width: int, height: int) -> Path:
    """Random pixels: no crop or flip of it equals another."""
    array = np.random.default_rng(width * 1000 + height).integers(0, 256, (height, width, 3))
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


# --- crop box and time ids --------------------------------------------------------------------


@pytest.mark.parametrize("width,height", [(120, 90), (70, 150)])
def test_reported_crop_box_is_where_the_pixels_come_from(
    tmp_path: Path, width: int, height: int
) -> None:
    image = Image.open(noise_image(tmp_path / "x.png", width, height)).convert("RGB")
    scale = RESOLUTION / min(width, height)
    # The shorter side to RESOLUTION, as preprocess_with_crop documents.
    size = (max(RESOLUTION, round(width * scale)), max(RESOLUTION, round(height * scale)))
    resized = image.resize(size, Image.Resampling.BILINEAR)
    seen = {True: 0, False: 0}
    for seed in range(16):
        pixels, (top, left) = preprocess_with_crop(
            image, RESOLUTION, center_crop=False, random_flip=True, rng=random.Random(seed)
        )
        # A flipped sample's box is counted in the mirrored image, which the pixels show.
        matches = {}
        for flipped in (False, True):
            source = ImageOps.mirror(resized) if flipped else resized
            crop = source.crop((left, top, left + RESOLUTION, top + RESOLUTION))
            expected = torch.from_numpy(np.array(crop, dtype=np.uint8)).permute(2, 0, 1)
            matches[flipped] = torch.equal(pixels, expected.float().div(127.5).sub(1.0))
        assert sum(matches.values()) == 1, f"seed {seed}: box {(top, left)} matches no crop"
        seen[matches[True]] += 1
    assert seen[True] and seen[False]  # both cases ran


class RecordingUNet:
    """Stands in for the UNet: keeps what it is called with."""

    def __call__(self, sample, timestep, encoder_hidden_states, **kwargs):
        self.kwargs = kwargs
        return (torch.zeros_like(sample),)


def test_time_ids_are_original_size_crop_and_target_as_diffusers_makes_them(
    tmp_path: Path, tiny_sdxl
) -> None:
    sizes = [(120, 90), (70, 150), (64, 64)]
    examples = [
        Example(noise_image(tmp_path / f"{w}x{h}.png", w, h), "a caption") for w, h in sizes
    ]
    data = DataConfig(train_dir=str(tmp_path), resolution=RESOLUTION, random_flip=True)
    family = StableDiffusionXL()
    dataset = CaptionedImageDataset(examples, lambda caption: {}, data)
    items = [dataset[SampleKey(i, augment_seed=7 + i)] for i in range(len(examples))]
    crops = [tuple(item["crop_top_left"].tolist()) for item in items]
    assert any(top for top, _ in crops) and any(left for _, left in crops)  # both axes tested
    batch = default_collate(items)
    conditioning = {
        "prompt_embeds": torch.zeros(3, 77, 64, dtype=torch.float64),
        "pooled_prompt_embeds": torch.zeros(3, 32),
    }
    unet = RecordingUNet()
    family.predict(unet, torch.zeros(3, 4, 8, 8), torch.tensor([1, 2, 3]), conditioning, batch)
    time_ids = unet.kwargs["added_cond_kwargs"]["time_ids"]
    assert time_ids.dtype == torch.float64 and time_ids.shape == (3, 6)
    for row, (w, h), crop in zip(time_ids, sizes, crops, strict=True):
        expected = tiny_sdxl._get_add_time_ids(
            (h, w), crop, (RESOLUTION, RESOLUTION), dtype=torch.float64,
            text_encoder_projection_dim=tiny_sdxl.text_encoder_2.config.projection_dim,
        )  # fmt: skip
        assert torch.equal(row, expected[0])
    assert unet.kwargs["added_cond_kwargs"]["text_embeds"] is conditioning["pooled_prompt_embeds"]


# --- text conditioning and the UNet call ----------------------------------------------------


def test_prompt_embeds_are_both_penultimate_states_and_pooled_is_the_second_projection(
    tiny_sdxl,
) -> None:
    family, parts = StableDiffusionXL(), parts_of(tiny_sdxl)
    prompts = ["a red circle", "a green square on white"]
    batch = default_collate([family.tokenize(parts, prompt) for prompt in prompts])
    with torch.no_grad():
        ours = family.encode_prompts(parts, batch, "cpu")
        embeds, _, pooled, _ = tiny_sdxl.encode_prompt(prompts, do_classifier_free_guidance=False)
    assert ours["prompt_embeds"].shape == (2, 77, 64)
    assert ours["pooled_prompt_embeds"].shape == (2, 32)
    torch.testing.assert_close(ours["prompt_embeds"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours["pooled_prompt_embeds"], pooled, rtol=0, atol=0)


def test_prediction_is_the_pipelines_unet_call(tiny_sdxl) -> None:
    family, parts = StableDiffusionXL(), parts_of(tiny_sdxl)
    batch = default_collate([family.tokenize(parts, "a red circle")] * 2)
    batch.update(
        target_size=torch.tensor([[RESOLUTION, RESOLUTION]] * 2),
        original_size=torch.tensor([[90, 120], [150, 70]]),
        crop_top_left=torch.tensor([[0, 11], [20, 0]]),
    )
    noisy, timesteps = (
        torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
        torch.tensor([10, 900]),
    )
    with torch.no_grad():
        conditioning = family.encode_prompts(parts, batch, "cpu")
        ours = family.predict(tiny_sdxl.unet, noisy, timesteps, conditioning, batch)
        time_ids = torch.tensor([[90, 120, 0, 11, 64, 64], [150, 70, 20, 0, 64, 64]]).float()
        theirs = tiny_sdxl.unet(
            noisy, timesteps, conditioning["prompt_embeds"], return_dict=False,
            added_cond_kwargs={"text_embeds": conditioning["pooled_prompt_embeds"], "time_ids": time_ids},
        )[0]  # fmt: skip
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_tiny_builtin_is_seeded_and_shards_by_unet_block() -> None:
    a, b, c = (StableDiffusionXL.build_tiny(seed) for seed in (0, 0, 1))
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        sa, sb, sc = (getattr(p, name).state_dict() for p in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
        assert any(not torch.equal(sa[k], sc[k]) for k in sa), name
    assert a.vae.config.scaling_factor == 0.13025
    assert StableDiffusionXL().shard_units(a.unet) == unet_blocks(a.unet)


# --- runs -------------------------------------------------------------------------------------


def test_a_pipeline_diffusers_saved_trains(tmp_path: Path, dummy_data_dir: Path) -> None:
    base = tmp_path / "base"
    StableDiffusionXL.build_tiny(seed=3).save_pretrained(base)
    out = tmp_path / "out"
    result = train(family_config("sdxl", out, dummy_data_dir, model={"pretrained": str(base)}))
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    saved = StableDiffusionXLPipeline.from_pretrained(out)
    assert type(saved) is StableDiffusionXLPipeline


def test_a_swapped_vae_in_fp32_trains_and_is_saved(
    tmp_path: Path, dummy_data_dir: Path, builtin_cache: Path
) -> None:
    vae_dir = tmp_path / "vae"
    StableDiffusionXL.build_tiny(seed=9).vae.save_pretrained(vae_dir)
    out = tmp_path / "out"
    model = {"vae": str(vae_dir), "vae_dtype": "fp32"}
    result = train(family_config("sdxl", out, dummy_data_dir, model=model))
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    saved = AutoencoderKL.from_pretrained(out / "vae").state_dict()
    swapped = AutoencoderKL.from_pretrained(vae_dir).state_dict()
    assert all(torch.equal(saved[k], swapped[k]) for k in swapped)


def test_text_encoder_lora_trains_both_encoders_and_loads_in_the_sdxl_pipeline(
    tmp_path: Path, dummy_data_dir: Path, builtin_cache: Path
) -> None:
    out = tmp_path / "out"
    lora = {"enabled": True, "rank": 4, "train_text_encoder": True}
    train(family_config("sdxl", out, dummy_data_dir, lora=lora, train={"learning_rate": 5e-2}))
    keys = load_file(out / "pytorch_lora_weights.safetensors").keys()
    for part in ("unet", "text_encoder", "text_encoder_2"):
        assert any(k.startswith(f"{part}.") for k in keys), part

    pipeline = StableDiffusionXLPipeline.from_pretrained(builtin_model_path("builtin:tiny-sdxl"))
    ids = pipeline.tokenizer("a red circle", padding="max_length", return_tensors="pt").input_ids

    def encoded() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            first = pipeline.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
            return first, pipeline.text_encoder_2(ids).text_embeds

    before = encoded()
    pipeline.load_lora_weights(str(out))
    after = encoded()
    adapters = pipeline.get_list_adapters()
    assert all(adapters.get(part) for part in ("unet", "text_encoder", "text_encoder_2"))
    for old, new in zip(before, after, strict=True):
        assert not torch.allclose(old, new, atol=1e-5)


def test_the_shipped_sdxl_lora_config_trains_on_the_tiny_sdxl(
    tmp_path: Path, dummy_data_dir: Path, builtin_cache: Path
) -> None:
    """configs/sdxl_lora.yaml as shipped passes SDXL's checks and, scaled down to the builtin
    (its own VAE instead of the fp16-fix one on the Hub), trains."""
    from difftrain.config import load_config

    path = Path(__file__).resolve().parents[2] / "configs" / "sdxl_lora.yaml"
    shipped = load_config(path)
    assert shipped.model.pretrained == "stabilityai/stable-diffusion-xl-base-1.0"
    assert shipped.model.vae == "madebyollin/sdxl-vae-fp16-fix"
    assert shipped.lora.enabled and shipped.lora.rank == 16
    StableDiffusionXL().check_config(shipped)
    cfg = load_config(
        path,
        [
            "model.pretrained=builtin:tiny-sdxl", "model.vae=null",
            f"data.train_dir={dummy_data_dir}", "data.resolution=64",
            f"train.output_dir={tmp_path / 'out'}", "train.max_steps=2",
            "train.mixed_precision='no'", "train.gradient_accumulation_steps=1",
            "validation.every_steps=0", "validation.num_inference_steps=2",
        ],
    )  # fmt: skip
    assert cfg.model.vae is None
    assert train(cfg).steps == 2
    keys = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors").keys()
    assert keys and all(key.startswith("unet.") for key in keys)
