"""LoRA in the kohya key format (`lora.export_formats: [diffusers, kohya]`).

diffusers' own loader reads the kohya file to the same image as the diffusers file; the module
names are the ones sd-scripts writes and ComfyUI / AUTOMATIC1111 match (checked against
diffusers' reader of original SDXL checkpoints and against real SD 1.5 / SDXL layouts, so a
converter that still round-trips through diffusers but renames modules goes red); the ss_*
metadata describes the run.

    .venv/bin/pytest tests/unit/test_lora_kohya.py -p no:xdist -q
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_families import family_class_source, family_config, sample

from difftrain import __version__
from difftrain.models.families import family_class
from difftrain.models.lora import LORA_WEIGHTS
from difftrain.models.lora_kohya import KOHYA_WEIGHTS, KohyaNames
from difftrain.training.trainer import train

SAME_IMAGE_ATOL = 1e-5
"""Both files hold the same fp32 tensors and the same alpha / rank scale: the images may only
differ by float rounding."""
CHANGED_BY_AT_LEAST = 1e-2
"""The adapters must move the image clearly, or "same image as the diffusers file" says
nothing (the base image would pass too)."""

# Every kind of SDXL layer the original names rename (resnet parts, samplers, embeddings,
# conv_in / conv_out), so diffusers' SDXL reader has to find each one where it was trained.
SDXL_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                "ff.net.2", "conv1", "conv2", "time_emb_proj", "conv_shortcut", "conv",
                "conv_in", "conv_out", "linear_1", "linear_2"]  # fmt: skip

RUNS = {
    # alpha != rank: a converter that writes alpha = rank (as diffusers' convert_state_dict_to_
    # kohya does) changes the adapters' scale, and the image.
    "sd": {"rank": 4, "alpha": 8.0, "train_text_encoder": True,
           "export_formats": ["diffusers", "kohya"]},
    # kohya alone: the diffusers file is still written (difftrain's own readers use it).
    "sdxl": {"rank": 4, "alpha": 2.0, "train_text_encoder": True, "export_formats": ["kohya"]},
}  # fmt: skip


def run_lora(family: str, out: Path, data: Path, lora: dict):
    # A high rate so that two steps move the image clearly (the adapters start at no effect).
    cfg = family_config(
        family, out, data, lora={"enabled": True, **lora}, train={"learning_rate": 5e-2}
    )
    train(cfg)
    return cfg


@pytest.fixture(scope="module", params=sorted(RUNS))
def lora_run(request, tmp_path_factory, dummy_data_dir: Path, builtin_cache: Path):
    family = request.param
    out = tmp_path_factory.mktemp(f"kohya-{family}") / "out"
    return family, run_lora(family, out, dummy_data_dir, RUNS[family]), out


@pytest.fixture(scope="module")
def all_layers_sdxl_run(tmp_path_factory, dummy_data_dir: Path, builtin_cache: Path):
    out = tmp_path_factory.mktemp("kohya-sdxl-all-layers") / "out"
    lora = {"rank": 4, "alpha": 2.0, "target_modules": SDXL_TARGETS, "export_formats": ["kohya"]}
    return run_lora("sdxl", out, dummy_data_dir, lora), out


def fresh_pipeline(family: str):
    import diffusers

    cls = getattr(diffusers, family_class(family).pipeline_class)
    return cls.from_pretrained(family_class_source(family))


def test_kohya_file_gives_the_diffusers_files_image(lora_run) -> None:
    family, cfg, out = lora_run
    assert (out / LORA_WEIGHTS).is_file() and (out / KOHYA_WEIGHTS).is_file()
    base = sample(fresh_pipeline(family)).numpy()

    from_diffusers = fresh_pipeline(family)
    from_diffusers.load_lora_weights(str(out))
    expected = sample(from_diffusers).numpy()

    from_kohya = fresh_pipeline(family)
    from_kohya.load_lora_weights(str(out), weight_name=KOHYA_WEIGHTS)
    adapters = from_kohya.get_list_adapters()
    assert set(adapters) == {"unet", *family_class(family).lora_text_encoders}, adapters
    got = sample(from_kohya).numpy()

    assert np.abs(expected - base).max() > CHANGED_BY_AT_LEAST
    assert np.allclose(got, expected, rtol=0, atol=SAME_IMAGE_ATOL), np.abs(got - expected).max()


def kohya_modules(out: Path, cfg) -> set[str]:
    """The file's module names, after checking each has down, up and the run's alpha."""
    tensors = load_file(out / KOHYA_WEIGHTS)
    modules = {key.split(".")[0] for key in tensors}
    assert set(tensors) == {
        f"{m}.{part}" for m in modules for part in ("lora_down.weight", "lora_up.weight", "alpha")
    }
    for module in modules:
        alpha = tensors[f"{module}.alpha"]
        assert alpha.shape == () and alpha.item() == cfg.lora.alpha
        assert tensors[f"{module}.lora_down.weight"].shape[0] == cfg.lora.rank
    return modules


def test_kohya_keys_are_sd_scripts_names_with_the_runs_alpha(lora_run) -> None:
    family, cfg, out = lora_run
    modules = kohya_modules(out, cfg)
    unet = {m.removeprefix("lora_unet_") for m in modules if m.startswith("lora_unet_")}
    text = modules - {f"lora_unet_{m}" for m in unet}
    if family == "sd":  # diffusers' module names, one text encoder: lora_te_
        assert all(m.startswith(("down_blocks_", "mid_block_", "up_blocks_")) for m in unet)
        assert "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in unet
        prefixes = {"lora_te"}
    else:  # the original (sgm) names, two text encoders: lora_te1_, lora_te2_
        # tiny SDXL: attention in input block 3, the middle block, output blocks 0 and 1.
        assert {m.split("_transformer_blocks_")[0] for m in unet} == {
            "input_blocks_3_1", "middle_block_1", "output_blocks_0_1", "output_blocks_1_1"
        }  # fmt: skip
        prefixes = {"lora_te1", "lora_te2"}
    assert {m.split("_text_model_encoder_layers_")[0] for m in text} == prefixes
    for prefix in prefixes:
        assert f"{prefix}_text_model_encoder_layers_1_self_attn_out_proj" in text


def test_every_sdxl_layer_kind_reads_back_into_diffusers_as_trained(all_layers_sdxl_run) -> None:
    """diffusers' SDXL reader renumbers the original names from the UNet config: every
    adapter must land on the module it was trained on, with the run's alpha / rank."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    from difftrain.models.lora import add_lora_adapters, load_lora_weights_into

    cfg, out = all_layers_sdxl_run
    modules = kohya_modules(out, cfg)
    assert {"lora_unet_input_blocks_0_0", "lora_unet_input_blocks_2_0_op", "lora_unet_out_2",
            "lora_unet_time_embed_0", "lora_unet_label_emb_0_2", "lora_unet_middle_block_1_proj_in",
            "lora_unet_output_blocks_1_2_conv", "lora_unet_output_blocks_3_0_in_layers_2",
            "lora_unet_input_blocks_3_0_skip_connection",
            "lora_unet_output_blocks_0_0_emb_layers_1"} <= modules  # fmt: skip

    # What the run trained, read back as a resume reads it.
    trained = fresh_pipeline("sdxl").unet
    add_lora_adapters(trained, {}, cfg.lora)
    load_lora_weights_into(out, family_class("sdxl")(), trained)
    expected = get_peft_model_state_dict(trained)

    pipeline = fresh_pipeline("sdxl")
    pipeline.load_lora_weights(str(out), weight_name=KOHYA_WEIGHTS)
    (adapter,) = pipeline.get_list_adapters()["unet"]
    got = get_peft_model_state_dict(pipeline.unet, adapter_name=adapter)
    assert len(expected) == 2 * len(modules) and set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    layers = [m for m in pipeline.unet.modules() if isinstance(m, LoraLayer)]
    assert {layer.scaling[adapter] for layer in layers} == {cfg.lora.alpha / cfg.lora.rank}


def test_kohya_metadata_describes_the_run(lora_run) -> None:
    family, cfg, out = lora_run
    path = out / KOHYA_WEIGHTS
    with safe_open(str(path), framework="pt") as weights:
        metadata = weights.metadata()
    sdxl = family == "sdxl"
    expected = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(cfg.lora.rank),
        "ss_network_alpha": str(cfg.lora.alpha),
        "ss_network_dropout": "0.0",
        "ss_base_model_version": "sdxl_base_v1-0" if sdxl else "sd_v1",
        "ss_v2": "False",
        "ss_sd_model_name": cfg.model.pretrained,
        "ss_resolution": "(64, 64)",
        "ss_max_train_steps": "2",
        "ss_steps": "2",
        "ss_learning_rate": "0.05",
        "ss_text_encoder_lr": "0.05",
        "ss_seed": str(cfg.train.seed),
        "ss_num_train_images": "8",
        "ss_total_batch_size": "2",
        "ss_flip_aug": "True",
        "ss_training_comment": f"difftrain {__version__}",
        "ss_output_name": "out",
        "modelspec.architecture": ("stable-diffusion-xl-v1-base" if sdxl
                                   else "stable-diffusion-v1") + "/lora",
        "modelspec.resolution": "64x64",
        "modelspec.prediction_type": "epsilon",
    }  # fmt: skip
    assert {key: metadata.get(key) for key in expected} == expected
    # sd-scripts' "addnet" hash, which A1111 reads instead of hashing: the tensor bytes.
    blob = path.read_bytes()
    header = int.from_bytes(blob[:8], "little")
    assert metadata["sshs_model_hash"] == hashlib.sha256(blob[8 + header :]).hexdigest()
    card = (out / "README.md").read_text()
    assert KOHYA_WEIGHTS in card and "models/loras/" in card


def test_sdxl_original_names_are_what_diffusers_reads_from_an_original_checkpoint(
    builtin_cache: Path,
) -> None:
    """Write the tiny SDXL UNet under the kohya file's module names as an original (LDM)
    checkpoint: diffusers' single-file reader, which knows that layout (the one ComfyUI and
    A1111 load natively), must give back every tensor at its own place."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = family_class("sdxl").build_tiny(0).unet
    names = KohyaNames(family_class("sdxl")(), unet)
    original = {}
    for key, tensor in unet.state_dict().items():
        module, _, param = key.rpartition(".")
        path = names.unet_path(module)
        assert names("unet", module) == "lora_unet_" + path.replace(".", "_")
        original[f"model.diffusion_model.{path}.{param}"] = tensor
    back = convert_ldm_unet_checkpoint(original, dict(unet.config))
    assert set(back) == set(unet.state_dict())
    assert all(torch.equal(back[k], v) for k, v in unet.state_dict().items())


# Real-size layouts (structure only, on the meta device) and names found in kohya LoRAs
# published for them: what ComfyUI and A1111 users load.
SD15_UNET = {"cross_attention_dim": 768}  # the rest are UNet2DConditionModel's defaults
SDXL_UNET = {
    "sample_size": 128, "block_out_channels": (320, 640, 1280), "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}  # fmt: skip
PUBLISHED = {
    "sd": (SD15_UNET, {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q":
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "mid_block.attentions.0.proj_in": "lora_unet_mid_block_attentions_0_proj_in",
        "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0":
            "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0",
        "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2":
            "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2",
    }, {"text_encoder": "lora_te"}),
    "sdxl": (SDXL_UNET, {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q":
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k":
            "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_k",
        "down_blocks.1.resnets.0.conv1": "lora_unet_input_blocks_4_0_in_layers_2",
        "down_blocks.0.downsamplers.0.conv": "lora_unet_input_blocks_3_0_op",
        "mid_block.attentions.0.transformer_blocks.9.attn1.to_out.0":
            "lora_unet_middle_block_1_transformer_blocks_9_attn1_to_out_0",
        "mid_block.resnets.1.time_emb_proj": "lora_unet_middle_block_2_emb_layers_1",
        "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v":
            "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_v",
        "up_blocks.1.attentions.2.proj_out": "lora_unet_output_blocks_5_1_proj_out",
        "up_blocks.0.upsamplers.0.conv": "lora_unet_output_blocks_2_2_conv",
        "up_blocks.2.resnets.2.conv2": "lora_unet_output_blocks_8_0_out_layers_3",
    }, {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}),
}  # fmt: skip


@pytest.mark.parametrize("family", sorted(PUBLISHED))
def test_names_on_real_layouts_are_the_published_kohya_names(family: str) -> None:
    from diffusers import UNet2DConditionModel

    config, expected, text_prefixes = PUBLISHED[family]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    names = KohyaNames(family_class(family)(), unet)
    modules = dict(unet.named_modules())
    for module, kohya in expected.items():
        assert module in modules and names("unet", module) == kohya
    for encoder, prefix in text_prefixes.items():
        got = names(encoder, "text_model.encoder.layers.11.self_attn.out_proj")
        assert got == f"{prefix}_text_model_encoder_layers_11_self_attn_out_proj"
    # Every layer an adapter can sit on has a name, and no two share one.
    layers = [
        m for m, mod in modules.items() if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))
    ]
    assert len({names("unet", m) for m in layers}) == len(layers)


@pytest.mark.parametrize(("lora", "kohya"), [(True, True), (True, False), (False, True)])
def test_model_card_tells_where_the_kohya_file_goes_only_when_written(
    tmp_path: Path, lora: bool, kohya: bool
) -> None:
    from difftrain.training.model_card import write_model_card

    card = write_model_card(
        tmp_path, base_model="org/base", data_dir="data", num_images=1, settings={},
        final_loss=None, steps=1, lora=lora, sample_grid=None, kohya=kohya,
    ).read_text()  # fmt: skip
    told = KOHYA_WEIGHTS in card and "models/loras/" in card
    assert told == (lora and kohya)
