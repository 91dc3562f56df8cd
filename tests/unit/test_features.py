"""Training features on the tiny model: LoRA, EMA, precision and memory flags, loss options,
validation images and loss, model card."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difftrain.config import config_from_dict
from difftrain.errors import ConfigError, UserError
from difftrain.models.lora import LORA_WEIGHTS
from difftrain.training.metrics import read_metrics
from difftrain.training.trainer import train

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def config(output_dir: Path, data_dir: Path, **sections):
    raw = {
        "model": {"pretrained": "builtin:tiny"},
        "data": {"train_dir": str(data_dir), "resolution": 64},
        "train": {"output_dir": str(output_dir), "max_steps": 2, "batch_size": 2,
                  "learning_rate": 1e-3, "deterministic": True},
        "checkpointing": {"every_steps": 0},
    }  # fmt: skip
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return config_from_dict(raw)


def generate(pipe, seed: int = 0) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    image = pipe("a red circle", num_inference_steps=3, generator=generator, output_type="pt")
    return image.images[0]


# --- LoRA ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, dummy_data_dir: Path, tiny_model_dir: Path):
    out = tmp_path_factory.mktemp("lora") / "out"
    cfg = config(
        out, dummy_data_dir,
        train={"max_steps": 3, "learning_rate": 5e-2},
        lora={"enabled": True, "rank": 4, "alpha": 8.0},
        checkpointing={"every_steps": 3},
    )  # fmt: skip
    return train(cfg)


def test_lora_output_is_only_the_adapter_in_diffusers_format(lora_run) -> None:
    out = lora_run.output_dir
    state = load_file(out / LORA_WEIGHTS)
    assert state and all(key.startswith("unet.") and "lora" in key for key in state)
    assert not (out / "model_index.json").exists() and not (out / "unet").exists()
    assert (out / "checkpoint-3" / LORA_WEIGHTS).is_file()  # every checkpoint carries it
    assert "load_lora_weights" in (out / "README.md").read_text()


def test_lora_loads_into_the_base_pipeline_and_changes_the_image(
    lora_run, tiny_model_dir: Path
) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    before = generate(pipe)
    pipe.load_lora_weights(lora_run.output_dir)
    after = generate(pipe)
    assert not torch.equal(before, after)
    (config_,) = pipe.unet.peft_config.values()
    assert config_.r == 4 and config_.lora_alpha == 8.0  # alpha survives the round trip


def test_lora_on_more_than_attention_loads_every_adapter(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir: Path
) -> None:
    """Convolutions and projections too: diffusers' loader reads a file's key format from
    its first key, so one file with two formats lost every adapter of the other."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "proj_in", "ff.net.2"]
    cfg = config(
        tmp_path / "out", dummy_data_dir,
        train={"max_steps": 1, "learning_rate": 5e-2},
        lora={"enabled": True, "target_modules": targets},
    )  # fmt: skip
    out = train(cfg).output_dir
    saved = load_file(out / LORA_WEIGHTS)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipe.load_lora_weights(out)
    (adapter,) = pipe.unet.peft_config
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name=adapter)
    assert len(loaded) == len(saved) > 0
    assert any(".conv1." in key for key in loaded) and any(".ff.net.2." in key for key in loaded)
    for key, value in loaded.items():
        assert torch.equal(value, saved[f"unet.{key}"]), key


def test_lora_trains_only_the_adapter(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir: Path
) -> None:
    from difftrain.config.schema import LoraConfig, ModelConfig
    from difftrain.models.loading import load_components
    from difftrain.models.lora import add_lora_adapters

    parts = load_components(ModelConfig(pretrained=str(tiny_model_dir)))
    add_lora_adapters(
        parts.denoiser,
        parts.text_encoders,
        LoraConfig(enabled=True, train_text_encoder=True),
    )
    trainable = [name for name, p in parts.denoiser.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert all(p.dtype == torch.float32 for p in parts.denoiser.parameters() if p.requires_grad)
    assert any(p.requires_grad for p in parts.parts["text_encoder"].parameters())


def test_lora_with_the_text_encoder(tmp_path: Path, dummy_data_dir: Path, tiny_model_dir) -> None:
    cfg = config(
        tmp_path / "out", dummy_data_dir, lora={"enabled": True, "train_text_encoder": True}
    )
    result = train(cfg)
    keys = load_file(result.output_dir / LORA_WEIGHTS).keys()
    assert any(k.startswith("text_encoder.") for k in keys) and any(
        k.startswith("unet.") for k in keys
    )


# --- EMA ----------------------------------------------------------------------------------


def test_ema_follows_the_decay_schedule(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir
) -> None:
    out = tmp_path / "out"
    cfg = config(
        out, dummy_data_dir, train={"max_steps": 3},
        ema={"enabled": True, "decay": 0.9999, "warmup": True, "inv_gamma": 1.0, "power": 2 / 3},
        checkpointing={"every_steps": 1},
    )  # fmt: skip
    train(cfg)
    raw = [load_file(out / f"checkpoint-{n}" / UNET_WEIGHTS) for n in (1, 2, 3)]
    ema = load_file(out / "checkpoint-3" / "unet_ema" / "diffusion_pytorch_model.safetensors")
    # diffusers' EMA: no averaging on the first update, then decay_k = 1 - (1 + k) ** -power.
    d2, d3 = 1 - 2 ** (-2 / 3), 1 - 3 ** (-2 / 3)
    for key in raw[0]:
        expected = d3 * (d2 * raw[0][key] + (1 - d2) * raw[1][key]) + (1 - d3) * raw[2][key]
        torch.testing.assert_close(ema[key], expected, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(ema[k], raw[2][k]) for k in ema)  # EMA differs from the raw weights
    final = load_file(out / UNET_WEIGHTS)
    assert all(torch.equal(final[k], ema[k]) for k in ema)  # ema.use_for_final


def test_ema_can_leave_the_raw_weights_as_final(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir
) -> None:
    out = tmp_path / "out"
    train(
        config(
            out,
            dummy_data_dir,
            ema={"enabled": True, "use_for_final": False},
            checkpointing={"every_steps": 2},
        )
    )
    raw, final = load_file(out / "checkpoint-2" / UNET_WEIGHTS), load_file(out / UNET_WEIGHTS)
    assert all(torch.equal(raw[k], final[k]) for k in raw)


def test_ema_with_lora_is_refused() -> None:
    with pytest.raises(ConfigError, match="ema.enabled: works with full fine-tuning only"):
        config_from_dict(
            {"data": {"train_dir": "x"}, "ema": {"enabled": True}, "lora": {"enabled": True}}
        )


# --- resume with adapters or EMA ----------------------------------------------------------


@pytest.mark.parametrize(
    ("sections", "weights"),
    [
        ({"lora": {"enabled": True, "train_text_encoder": True}}, LORA_WEIGHTS),
        ({"ema": {"enabled": True, "decay": 0.99}}, UNET_WEIGHTS),
    ],
    ids=["lora", "ema"],
)
def test_resume_is_bit_exact_with(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir, sections, weights
) -> None:
    straight = train(config(tmp_path / "a", dummy_data_dir, train={"max_steps": 4}, **sections))
    first_half = config(
        tmp_path / "b",
        dummy_data_dir,
        train={"max_steps": 2},
        checkpointing={"every_steps": 2},
        **sections,
    )
    train(first_half)
    resume = {"max_steps": 4, "resume_from_checkpoint": "latest"}
    resumed = train(config(tmp_path / "b", dummy_data_dir, train=resume, **sections))
    assert resumed.losses == straight.losses[2:]
    a, b = load_file(straight.output_dir / weights), load_file(resumed.output_dir / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- precision, memory, loss options --------------------------------------------------------


@pytest.mark.parametrize(
    "train_options",
    [
        {"gradient_checkpointing": True, "allow_tf32": True},
        {"snr_gamma": 0.1},  # small: nearly every timestep is down-weighted
        {"noise_offset": 0.1, "input_perturbation": 0.1},
        {"mixed_precision": "bf16", "snr_gamma": 1.0},
    ],
    ids=["checkpointing-tf32", "min-snr", "offset-perturbation", "bf16-min-snr"],
)
def test_options_train_and_change_the_run(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir, train_options, monkeypatch
) -> None:
    base = train(config(tmp_path / "base", dummy_data_dir))
    recomputed = []
    real_checkpoint = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(*args, **kwargs):
        recomputed.append(1)
        return real_checkpoint(*args, **kwargs)

    # diffusers binds torch's checkpoint function when checkpointing is enabled (in train()).
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    result = train(config(tmp_path / "opt", dummy_data_dir, train=train_options))
    assert all(torch.isfinite(torch.tensor(loss)) for loss in result.losses)
    if "gradient_checkpointing" in train_options:
        assert recomputed, "gradient_checkpointing: true recomputed no activations"
        # Recomputing activations must not change the maths.
        torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(base.losses))
    else:
        assert result.losses != base.losses


def test_prediction_type_override_reaches_the_saved_scheduler(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir
) -> None:
    result = train(
        config(tmp_path / "out", dummy_data_dir, train={"prediction_type": "v_prediction"})
    )
    scheduler = json.loads((result.output_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    log = (result.output_dir / "logs" / "train.log").read_text()
    assert "v_prediction prediction" in log
    assert "images per step, cpu, torch AdamW (fused))" in log  # the run's one summary line


def test_8bit_adam_without_bitsandbytes_is_a_clear_error(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir, monkeypatch
) -> None:
    import builtins

    real_import = builtins.__import__

    def no_bitsandbytes(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)
    with pytest.raises(UserError, match="train.use_8bit_adam: needs the bitsandbytes package"):
        train(config(tmp_path / "out", dummy_data_dir, train={"use_8bit_adam": True}))


def test_caption_dropout_empties_some_captions_reproducibly(
    dummy_data_dir: Path, tiny_model_dir: Path
) -> None:
    from transformers import CLIPTokenizer

    from difftrain.config.schema import DataConfig
    from difftrain.data.dataset import CaptionedImageDataset
    from difftrain.data.folder import scan_image_folder
    from difftrain.data.sampler import SampleKey

    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    empty = tokenizer(
        "", padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids[0]
    from difftrain.models.families.sd import StableDiffusion

    cfg = DataConfig(train_dir=str(dummy_data_dir), resolution=32, caption_dropout=0.5)
    tokenize = partial(StableDiffusion().tokenize, {"tokenizer": tokenizer})
    dataset = CaptionedImageDataset(scan_image_folder(dummy_data_dir), tokenize, cfg)

    def ids(seed: int) -> torch.Tensor:
        return dataset[SampleKey(0, seed)]["tokens.tokenizer"]

    dropped = [torch.equal(ids(seed), empty) for seed in range(200)]
    assert 60 < sum(dropped) < 140
    again = [torch.equal(ids(seed), empty) for seed in range(200)]
    assert dropped == again


# --- validation ---------------------------------------------------------------------------


def test_validation_grids_and_loss(tmp_path: Path, dummy_data_dir: Path, tiny_model_dir) -> None:
    from PIL import Image

    out = tmp_path / "out"
    cfg = config(
        out, dummy_data_dir, train={"max_steps": 4},
        validation={"prompts": ["a red circle", "a blue square"], "every_steps": 2,
                    "num_inference_steps": 2, "loss_every_steps": 2, "loss_dir": str(dummy_data_dir),
                    "loss_timesteps": [100, 900]},
    )  # fmt: skip
    train(cfg)
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-2.png", "step-4.png"]
    with Image.open(out / "samples" / "step-4.png") as grid:
        assert grid.format == "PNG" and grid.size[0] == 2 * 64
    rows = read_metrics(out / "metrics.jsonl")
    assert ["val_loss" in row for row in rows] == [False, True, False, True]
    assert rows[1]["val_loss"] != rows[3]["val_loss"]
    assert "samples/step-4.png" in (out / "README.md").read_text()


def test_validation_loss_is_the_same_number_for_the_same_weights(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir: Path
) -> None:
    from difftrain.config.schema import ModelConfig
    from difftrain.models.loading import load_components
    from difftrain.training.validation_loss import ValidationLoss

    cfg = config(
        tmp_path,
        dummy_data_dir,
        validation={"loss_every_steps": 1, "loss_dir": str(dummy_data_dir)},
    )
    from difftrain.training.objective import DdpmObjective, LossSettings

    parts = load_components(ModelConfig(pretrained=str(tiny_model_dir)))
    objective = DdpmObjective(parts.noise_scheduler, LossSettings("epsilon"), torch.device("cpu"))
    scorer = ValidationLoss(cfg, parts, objective)
    first = scorer(parts.denoiser)
    assert first == scorer(parts.denoiser)
    with torch.no_grad():
        next(parts.denoiser.parameters()).add_(0.5)
    assert scorer(parts.denoiser) != first


def test_validation_loss_needs_a_folder() -> None:
    with pytest.raises(ConfigError, match="validation.loss_dir: is required"):
        config_from_dict({"data": {"train_dir": "x"}, "validation": {"loss_every_steps": 5}})


def test_report_to_a_missing_package_is_exit_2(
    tmp_path: Path, dummy_data_dir: Path, capsys, monkeypatch
) -> None:
    import importlib.util

    from difftrain.cli import main

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "wandb" else real_find_spec(name, *a),
    )
    config_file = tmp_path / "c.yaml"
    config_file.write_text(
        f"data: {{train_dir: {dummy_data_dir}, resolution: 64}}\ntrain: {{report_to: wandb}}\n"
    )
    code = main(["train", "--config", str(config_file), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        code == 2 and len(err) == 1 and "train.report_to: wandb needs the wandb package" in err[0]
    )
    assert not (tmp_path / "out").exists()


def test_model_card_describes_a_full_run(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir
) -> None:
    result = train(config(tmp_path / "out", dummy_data_dir))
    card = (result.output_dir / "README.md").read_text()
    assert "StableDiffusionPipeline.from_pretrained" in card
    assert f"- Data: `{dummy_data_dir}` (8 images)" in card
    assert f"{result.losses[-1]:.4f}"[:5] in card
