"""Single-file checkpoints, both ways: `difftrain export --format single-file` writes the
original key layout, which diffusers' own reader (`from_single_file`) turns back into the
folder's weights tensor for tensor; and `model.pretrained: file.safetensors` trains exactly as
the folder it came from.

Read-backs use a copy of the pipeline folder without its weights as `config=`: diffusers
takes a component the file lacks from the config folder's weights when it has them, which
would hide a component the export left out.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_families import family_config

from difftrain.cli import main
from difftrain.models.tiny import builtin_model_path
from difftrain.training.trainer import train

OFFLINE = {"local_files_only": True}


def configs_only(folder: Path, target: Path) -> Path:
    """`folder` without its weights: what from_single_file may read besides the file."""
    shutil.copytree(folder, target, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return target


def export(run_dir: Path, output: Path, *extra: str) -> Path:
    assert main(["export", str(run_dir), "--format", "single-file", "--output", str(output),
                 *extra]) == 0  # fmt: skip
    return output


def assert_same_weights(expected: torch.nn.Module, loaded: torch.nn.Module, name: str) -> None:
    want, got = expected.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys(), name
    for key, tensor in want.items():
        assert not got[key].is_meta, f"{name}.{key} was not in the file"
        assert torch.equal(tensor, got[key].to(tensor.dtype)), f"{name}.{key} differs"


def file_keys(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as handle:
        return set(handle.keys())


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


def save_pipeline(pipeline, folder: Path) -> Path:
    pipeline.save_pretrained(str(folder), safe_serialization=True)
    return folder


def sd2_pipeline():
    """The tiny SD pipeline with an OpenCLIP-style (GELU) text encoder, as SD 2.x has."""
    from transformers import CLIPTextModel

    from difftrain.models.tiny import build_tiny_pipeline

    pipeline = build_tiny_pipeline("tiny", seed=3)
    config = pipeline.text_encoder.config
    config.hidden_act = "gelu"
    torch.manual_seed(4)
    pipeline.text_encoder = CLIPTextModel(config)
    return pipeline


def sdxl_pipeline(seed: int = 0):
    """The tiny SDXL pipeline with encoders of different widths (32 and 48), as SDXL's
    (768 and 1280): diffusers' reader tells the two apart by width."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from difftrain.models.families import tiny_parts
    from difftrain.models.families.sdxl import StableDiffusionXL

    base = StableDiffusionXL.build_tiny(seed)
    text_encoder_2 = tiny_parts.clip_text_encoder(
        base.tokenizer_2, seed + 3, hidden_size=48, projection=True
    )
    config = dict(base.unet.config)
    config.update(cross_attention_dim=32 + 48, projection_class_embeddings_input_dim=48 + 6 * 8)
    torch.manual_seed(seed)
    return StableDiffusionXLPipeline(
        vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2,
        unet=UNet2DConditionModel.from_config(config), scheduler=base.scheduler,
        add_watermarker=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory) -> Path:
    return save_pipeline(sdxl_pipeline(), tmp_path_factory.mktemp("sdxl") / "pipe")


# --- export ------------------------------------------------------------------------------------


def test_a_trained_sd_run_exports_to_a_checkpoint_diffusers_reads_back_exactly(
    tmp_path: Path, dummy_data_dir: Path, builtin_cache: Path
) -> None:
    from diffusers import StableDiffusionPipeline

    run_dir = tmp_path / "run"
    train(family_config("sd", run_dir, dummy_data_dir))
    path = export(run_dir, tmp_path / "out" / "model.safetensors")

    keys = file_keys(path)
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys  # the CompVis layout
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in keys
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys
    info = metadata(path)
    assert info["format"] == "pt"
    assert info["modelspec.architecture"] == "stable-diffusion-v1"
    assert info["modelspec.resolution"] == "64x64"
    assert not [p for p in path.parent.iterdir() if p != path]  # no temporary file left

    config = configs_only(run_dir, tmp_path / "configs")
    loaded = StableDiffusionPipeline.from_single_file(str(path), config=str(config), **OFFLINE)
    folder = StableDiffusionPipeline.from_pretrained(run_dir)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(folder, name), getattr(loaded, name), name)
    # The run's trained weights, not the base model's, are what went in.
    base = StableDiffusionPipeline.from_pretrained(builtin_model_path("builtin:tiny"))
    assert not torch.equal(base.unet.conv_in.weight, loaded.unet.conv_in.weight)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_sd2_keeps_its_openclip_text_encoder_in_openclip_layout(
    prediction: str, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionPipeline

    pipeline = sd2_pipeline()
    pipeline.scheduler.register_to_config(prediction_type=prediction)
    folder = save_pipeline(pipeline, tmp_path / "sd2")
    path = export(folder, tmp_path / "sd2.safetensors")

    keys = file_keys(path)
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert not any(key.startswith("cond_stage_model.transformer.") for key in keys)
    expected = {"epsilon": "stable-diffusion-v2-512", "v_prediction": "stable-diffusion-v2-768-v"}
    assert metadata(path)["modelspec.architecture"] == expected[prediction]
    config = configs_only(folder, tmp_path / "configs")
    loaded = StableDiffusionPipeline.from_single_file(str(path), config=str(config), **OFFLINE)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(pipeline, name), getattr(loaded, name), name)


def test_sdxl_exports_both_text_encoders_in_sgm_layout(tmp_path: Path, sdxl_dir: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    path = export(sdxl_dir, tmp_path / "xl.safetensors")
    keys = file_keys(path)
    # OpenCLIP's fused attention input, and its projection as a bare matrix.
    assert "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight" in keys
    assert "conditioner.embedders.1.model.text_projection" in keys
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight" in keys
    assert "model.diffusion_model.label_emb.0.0.weight" in keys  # SDXL's size conditioning
    assert metadata(path)["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    config = configs_only(sdxl_dir, tmp_path / "configs")
    loaded = StableDiffusionXLPipeline.from_single_file(str(path), config=str(config), **OFFLINE)
    folder = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert_same_weights(getattr(folder, name), getattr(loaded, name), name)


def test_sdxl_encoders_of_one_width_are_exported_with_a_warning(
    tmp_path: Path, builtin_cache: Path, capsys
) -> None:
    # The builtin's two encoders are both 32 wide: diffusers' reader cannot tell them apart.
    path = export(builtin_model_path("builtin:tiny-sdxl"), tmp_path / "xl.safetensors")
    assert "same width" in capsys.readouterr().err
    assert "conditioner.embedders.1.model.positional_embedding" in file_keys(path)


def test_sd3_exports_its_transformer_and_vae(tmp_path: Path, builtin_cache: Path) -> None:
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    folder = builtin_model_path("builtin:tiny-sd3")  # with SD3.5's QK-norm and MMDiT-X layer
    path = export(folder, tmp_path / "sd3.safetensors")
    keys = file_keys(path)
    assert "model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight" in keys
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
    assert not any(key.startswith("text_encoders.") for key in keys)
    assert metadata(path)["modelspec.architecture"] == "stable-diffusion-3"
    config = str(configs_only(folder, tmp_path / "configs"))
    for cls, name in ((SD3Transformer2DModel, "transformer"), (AutoencoderKL, "vae")):
        loaded = cls.from_single_file(str(path), config=config, subfolder=name, **OFFLINE)
        assert_same_weights(cls.from_pretrained(folder, subfolder=name), loaded, name)


def test_flux_exports_its_transformer_in_the_bfl_layout(tmp_path: Path, builtin_cache: Path):
    # diffusers' reader splits single blocks by Flux.1's width (3072), so it cannot read the
    # tiny builtin: its file is checked against the layout here, and the slow test below
    # reads a Flux.1-wide transformer back through diffusers.
    from diffusers import FluxTransformer2DModel

    folder = builtin_model_path("builtin:tiny-flux")
    path = export(folder, tmp_path / "flux.safetensors")
    model = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    state, written = model.state_dict(), load_file(path)
    assert metadata(path)["modelspec.architecture"] == "flux-1-dev"  # it has guidance input
    assert sum(t.numel() for t in written.values()) == sum(t.numel() for t in state.values())
    block = "single_transformer_blocks.0."
    parts = [state[f"{block}attn.to_{p}.weight"] for p in "qkv"] + [
        state[f"{block}proj_mlp.weight"]
    ]
    assert torch.equal(written["single_blocks.0.linear1.weight"], torch.cat(parts))
    qkv = [state[f"transformer_blocks.0.attn.add_{p}_proj.bias"] for p in "qkv"]
    assert torch.equal(written["double_blocks.0.txt_attn.qkv.bias"], torch.cat(qkv))
    assert torch.equal(
        written["double_blocks.0.img_attn.norm.key_norm.scale"],
        state["transformer_blocks.0.attn.norm_k.weight"],
    )
    scale, shift = state["norm_out.linear.weight"].chunk(2)
    assert torch.equal(written["final_layer.adaLN_modulation.1.weight"], torch.cat([shift, scale]))
    assert torch.equal(written["guidance_in.out_layer.bias"],
                       state["time_text_embed.guidance_embedder.linear_2.bias"])  # fmt: skip


@pytest.mark.slow
def test_a_flux1_wide_transformer_reads_back_through_diffusers(tmp_path: Path) -> None:
    """Flux.1's width (24 heads of 128) with one block of each kind: about 0.5 B parameters."""
    from diffusers import FluxTransformer2DModel

    from difftrain.export_command import write_checkpoint
    from difftrain.models.single_file import original_checkpoint

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # half the memory; bf16 -> fp32 is exact
    try:
        model = FluxTransformer2DModel(
            in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=32, pooled_projection_dim=32,
            guidance_embeds=True, axes_dims_rope=(16, 56, 56),
        )  # fmt: skip
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(tmp_path / "transformer")
    tensors, _ = original_checkpoint(tmp_path, "flux")
    write_checkpoint(tensors, {"format": "pt"}, tmp_path / "flux.safetensors")
    del tensors
    loaded = FluxTransformer2DModel.from_single_file(
        str(tmp_path / "flux.safetensors"), config=str(tmp_path), subfolder="transformer",
        torch_dtype=torch.bfloat16, **OFFLINE,
    )  # fmt: skip
    assert_same_weights(model, loaded, "transformer")


def test_export_replaces_an_existing_file_only_with_overwrite(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"not a checkpoint")
    assert main(["export", str(tiny_model_dir), "--output", str(target)]) == 2
    assert target.read_bytes() == b"not a checkpoint"
    export(tiny_model_dir, target, "--overwrite")
    assert "model.diffusion_model.out.2.weight" in file_keys(target)


@pytest.mark.parametrize("where", ["under a file", "/proc"])
def test_a_folder_that_cannot_take_the_file_is_one_line_even_past_the_checks(
    where: str, tmp_path: Path
) -> None:
    # check_output refuses these up front; one made so since (or a race) is still one line.
    from difftrain.errors import UserError
    from difftrain.export_command import write_checkpoint

    if where == "/proc" and not Path("/proc/self").is_dir():
        pytest.skip("needs /proc, a folder no one can make files in")
    blocker = tmp_path / "a-file"
    blocker.write_text("kept")
    target = blocker / "x.safetensors" if where == "under a file" else Path("/proc/x.safetensors")
    with pytest.raises(UserError, match="could not write it"):
        write_checkpoint({"w": torch.zeros(1)}, {"format": "pt"}, target)
    assert blocker.read_text() == "kept"


def test_noise_prediction_families_record_their_prediction_type(
    tmp_path: Path, builtin_cache: Path
) -> None:
    pipeline = sd2_pipeline()
    pipeline.scheduler.register_to_config(prediction_type="v_prediction")
    path = export(save_pipeline(pipeline, tmp_path / "sd2"), tmp_path / "sd2.safetensors")
    assert metadata(path)["modelspec.prediction_type"] == "v"
    # A flow model predicts velocity, whatever its scheduler config says.
    sd3 = tmp_path / "sd3"
    shutil.copytree(builtin_model_path("builtin:tiny-sd3"), sd3)
    scheduler = sd3 / "scheduler" / "scheduler_config.json"
    scheduler.write_text(
        json.dumps({**json.loads(scheduler.read_text()), "prediction_type": "epsilon"})
    )
    assert "modelspec.prediction_type" not in metadata(export(sd3, tmp_path / "sd3.safetensors"))


# --- training from a single file -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory, builtin_cache) -> Path:
    folder = builtin_model_path("builtin:tiny")
    return export(folder, tmp_path_factory.mktemp("single") / "tiny.safetensors")


def outputs_equal(a: Path, b: Path, components: tuple[str, ...]) -> None:
    for name in components:
        files_a = sorted((a / name).glob("*.safetensors"))
        files_b = sorted((b / name).glob("*.safetensors"))
        assert files_a and len(files_a) == len(files_b), name
        for fa, fb in zip(files_a, files_b, strict=True):
            ta, tb = load_file(fa), load_file(fb)
            assert ta.keys() == tb.keys(), name
            assert all(torch.equal(ta[k], tb[k]) for k in ta), name


def test_training_from_the_file_is_training_from_its_folder(
    tmp_path: Path, dummy_data_dir: Path, tiny_file: Path, builtin_cache: Path
) -> None:
    from diffusers import StableDiffusionPipeline

    folder = builtin_model_path("builtin:tiny")
    steps = {"max_steps": 3}
    a = train(family_config("sd", tmp_path / "a", dummy_data_dir, train=steps,
                            model={"pretrained": str(folder)}))  # fmt: skip
    single = {"pretrained": str(tiny_file), "single_file_config": str(folder)}
    b = train(family_config("sd", tmp_path / "b", dummy_data_dir, train=steps, model=single))
    assert b.losses == a.losses
    # The final pipeline was saved whole (a file has no component folders to copy), and loads.
    outputs_equal(tmp_path / "a", tmp_path / "b", ("unet", "vae", "text_encoder"))
    assert StableDiffusionPipeline.from_pretrained(tmp_path / "b").unet is not None
    assert f"`{tiny_file}`" in (tmp_path / "b" / "README.md").read_text()  # the base model


def test_released_encoders_come_back_from_the_file(
    tmp_path: Path, dummy_data_dir: Path, tiny_file: Path, builtin_cache: Path, monkeypatch
) -> None:
    from difftrain.models.single_file import source

    folder = builtin_model_path("builtin:tiny")
    reloads = []
    real = source.load_single_file_components

    def spy(cfg, family, *, only=()):
        reloads.append(only)
        return real(cfg, family, only=only)

    monkeypatch.setattr(source, "load_single_file_components", spy)
    cached = {"cache_latents": True, "cache_text_embeddings": True, "random_flip": False,
              "center_crop": True}  # fmt: skip

    def run(name: str, model: dict):
        data = {**cached, "cache_dir": str(tmp_path / f"cache-{name}")}
        cfg = family_config("sd", tmp_path / name, dummy_data_dir, data=data,
                            train={"max_steps": 6}, model=model)  # fmt: skip
        return train(cfg).losses

    from_folder = run("folder", {"pretrained": str(folder)})
    from_file = run("file", {"pretrained": str(tiny_file), "single_file_config": str(folder)})
    assert from_file == from_folder
    # Loaded once whole, then the VAE and text encoder alone for the cold cache's misses.
    assert reloads[0] == () and ("vae", "text_encoder") in reloads[1:]


def test_a_run_from_the_file_resumes_bit_for_bit(
    tmp_path: Path, dummy_data_dir: Path, tiny_file: Path, builtin_cache: Path
) -> None:
    folder = builtin_model_path("builtin:tiny")
    model = {"pretrained": str(tiny_file), "single_file_config": str(folder)}
    train(family_config("sd", tmp_path / "straight", dummy_data_dir, model=model,
                        train={"max_steps": 4}))  # fmt: skip
    every = {"every_steps": 2}
    train(family_config("sd", tmp_path / "resumed", dummy_data_dir, model=model,
                        train={"max_steps": 2}, checkpointing=every))  # fmt: skip
    train(family_config("sd", tmp_path / "resumed", dummy_data_dir, model=model,
                        checkpointing=every,
                        train={"max_steps": 4, "resume_from_checkpoint": "latest"}))  # fmt: skip
    outputs_equal(tmp_path / "straight", tmp_path / "resumed", ("unet",))


def test_sdxl_trains_from_its_file_as_from_its_folder(
    tmp_path: Path, dummy_data_dir: Path, sdxl_dir: Path
) -> None:
    path = export(sdxl_dir, tmp_path / "xl.safetensors")
    a = train(family_config("sdxl", tmp_path / "a", dummy_data_dir,
                            model={"pretrained": str(sdxl_dir)}))  # fmt: skip
    single = {"pretrained": str(path), "single_file_config": str(sdxl_dir)}
    b = train(family_config("sdxl", tmp_path / "b", dummy_data_dir, model=single))
    assert b.losses == a.losses
    outputs_equal(tmp_path / "a", tmp_path / "b", ("unet", "text_encoder", "text_encoder_2"))


def test_a_hub_id_config_works_offline_from_the_cache(
    tmp_path: Path, tiny_file: Path, tiny_model_dir: Path, hub_cache
) -> None:
    hub_cache.install("someone/tiny-sd", tiny_model_dir)
    code = f"""
from difftrain.config.schema import ModelConfig
from difftrain.models.loading import load_components, model_family
cfg = ModelConfig(pretrained={str(tiny_file)!r}, single_file_config="someone/tiny-sd")
parts = load_components(cfg, model_family(cfg)).parts
print(sorted(parts), type(parts["unet"]).__name__)
"""
    result = hub_cache.run_python(code)
    assert result.returncode == 0, result.stderr
    assert "'unet', 'vae'] UNet2DConditionModel" in result.stdout


def test_sd3_trains_from_a_transformer_only_file_as_from_its_folder(
    tmp_path: Path, dummy_data_dir: Path, builtin_cache: Path
) -> None:
    # As Flux.1 and some SD3 files ship: no VAE, no text encoders. diffusers takes the text
    # encoders from the config folder's weights, difftrain the VAE.
    from safetensors.torch import save_file

    folder = builtin_model_path("builtin:tiny-sd3")
    exported = load_file(export(folder, tmp_path / "full.safetensors"))
    transformer_only = tmp_path / "transformer.safetensors"
    save_file({k: v for k, v in exported.items() if k.startswith("model.")}, transformer_only)
    a = train(family_config("sd3", tmp_path / "a", dummy_data_dir))
    single = {"pretrained": str(transformer_only), "single_file_config": str(folder)}
    b = train(family_config("sd3", tmp_path / "b", dummy_data_dir, model=single))
    assert b.losses == a.losses
    outputs_equal(tmp_path / "a", tmp_path / "b", ("transformer", "vae"))


def test_a_lora_run_from_the_file_says_how_to_load_its_base(
    tmp_path: Path, dummy_data_dir: Path, tiny_file: Path, builtin_cache: Path
) -> None:
    folder = builtin_model_path("builtin:tiny")
    model = {"pretrained": str(tiny_file), "single_file_config": str(folder)}
    out = tmp_path / "lora"
    train(family_config("sd", out, dummy_data_dir, model=model, lora={"enabled": True}))
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert f'StableDiffusionPipeline.from_single_file("{tiny_file}", config="{folder}")' in card
