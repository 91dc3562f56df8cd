"""Every model family does what SD 1.x does, on its tiny builtin: train, save a pipeline its
diffusers class loads and samples, LoRA that its pipeline loads and that changes the image,
bit-exact resume, and a held-out loss that falls.

Family-specific maths (SDXL's time ids, SD3's T5 handling, Flux's packing) is tested in
`test_family_<name>.py`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difftrain.config import config_from_dict
from difftrain.models.families import PIPELINE_CLASSES, family_class
from difftrain.models.tiny import BUILTINS
from difftrain.training.trainer import train

BUILTIN_OF = {"sd": "builtin:tiny", "sdxl": "builtin:tiny-sdxl", "sd3": "builtin:tiny-sd3",
              "flux": "builtin:tiny-flux"}  # fmt: skip
FAMILIES = sorted(BUILTIN_OF)


def family_config(family: str, output_dir: Path, data_dir: Path, **sections):
    raw = {
        "model": {"pretrained": BUILTIN_OF[family]},
        "data": {"train_dir": str(data_dir), "resolution": 64, "random_flip": True},
        "train": {
            "output_dir": str(output_dir),
            "max_steps": 2,
            "batch_size": 2,
            "learning_rate": 1e-3,
            "deterministic": True,
        },
        "checkpointing": {"every_steps": 0},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return config_from_dict(raw)


def sample(pipeline, prompt: str = "a red circle") -> torch.Tensor:
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    out = pipeline(
        prompt, num_inference_steps=2, height=64, width=64, generator=generator, output_type="pt"
    )
    return out.images


def denoiser_weights(output_dir: Path, family: str) -> dict[str, torch.Tensor]:
    name = family_class(family).denoiser
    return load_file(output_dir / name / "diffusion_pytorch_model.safetensors")


def test_every_family_has_a_builtin_and_a_pipeline_class() -> None:
    assert set(BUILTINS.values()) == set(PIPELINE_CLASSES)
    for family in FAMILIES:
        assert family_class(family).pipeline_class == PIPELINE_CLASSES[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_two_steps_save_a_pipeline_the_family_class_loads_and_samples(
    family: str, tmp_path: Path, dummy_data_dir: Path, builtin_cache: Path
) -> None:
    import diffusers

    cfg = family_config(family, tmp_path / "out", dummy_data_dir)
    result = train(cfg)
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    pipeline_class = getattr(diffusers, PIPELINE_CLASSES[family])
    pipeline = pipeline_class.from_pretrained(tmp_path / "out")
    assert type(pipeline) is pipeline_class
    images = sample(pipeline)
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()
    # The denoiser trained: its weights differ from the base model's.
    base = pipeline_class.from_pretrained(family_class_source(family))
    trained = getattr(pipeline, family_class(family).denoiser).state_dict()
    untouched = getattr(base, family_class(family).denoiser).state_dict()
    assert any(not torch.equal(trained[k], untouched[k]) for k in trained)
    assert f"{family} ({PIPELINE_CLASSES[family]})" in (tmp_path / "out" / "README.md").read_text()


def family_class_source(family: str) -> Path:
    from difftrain.models.tiny import builtin_model_path

    return builtin_model_path(BUILTIN_OF[family])


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_weights_load_in_the_family_pipeline_and_change_the_image(
    family: str, tmp_path: Path, dummy_data_dir: Path, builtin_cache: Path
) -> None:
    import diffusers

    out = tmp_path / "out"
    lora = {"enabled": True, "rank": 4}
    # A high rate for a visible change in two steps; the adapters start at zero effect.
    train(family_config(family, out, dummy_data_dir, lora=lora, train={"learning_rate": 5e-2}))
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    pipeline_class = getattr(diffusers, PIPELINE_CLASSES[family])
    pipeline = pipeline_class.from_pretrained(family_class_source(family))
    before = sample(pipeline)
    pipeline.load_lora_weights(str(out))
    assert any(pipeline.get_list_adapters().values())
    after = sample(pipeline)
    assert not torch.allclose(before, after, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_resume_three_plus_three_equals_six_bit_for_bit(
    family: str, tmp_path: Path, dummy_data_dir: Path, builtin_cache: Path
) -> None:
    straight = tmp_path / "straight"
    train(family_config(family, straight, dummy_data_dir, train={"max_steps": 6}))

    resumed = tmp_path / "resumed"
    checkpoints = {"every_steps": 3}
    train(family_config(family, resumed, dummy_data_dir, train={"max_steps": 3},
                        checkpointing=checkpoints))  # fmt: skip
    train(
        family_config(
            family,
            resumed,
            dummy_data_dir,
            checkpointing=checkpoints,
            train={"max_steps": 6, "resume_from_checkpoint": "latest"},
        )  # fmt: skip
    )
    a, b = denoiser_weights(straight, family), denoiser_weights(resumed, family)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", FAMILIES)
def test_held_out_loss_falls_after_forty_steps(
    family: str, tmp_path: Path, dummy_data_dir: Path, builtin_cache: Path
) -> None:
    import json

    from difftrain.models.loading import load_components, model_family
    from difftrain.training.model_setup import run_objective
    from difftrain.training.validation_loss import ValidationLoss

    cfg = family_config(
        family, tmp_path / "out", dummy_data_dir,
        train={"max_steps": 40, "learning_rate": 2e-3},
        validation={"loss_every_steps": 40, "loss_dir": str(dummy_data_dir)},
    )  # fmt: skip
    # The untrained model's score, with the run's fixed noise and timesteps.
    components = load_components(cfg.model, model_family(cfg.model, cfg.train))
    objective = run_objective(cfg.train, components, "cpu", torch.float32, False)
    untrained = ValidationLoss(cfg, components, objective)(components.denoiser)
    train(cfg)
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    (trained,) = [json.loads(line)["val_loss"] for line in lines if "val_loss" in line]
    assert trained < untrained


@pytest.mark.parametrize("family", FAMILIES)
def test_ema_gradient_checkpointing_bf16_and_a_validation_grid(
    family: str, tmp_path: Path, dummy_data_dir: Path, builtin_cache: Path
) -> None:
    from PIL import Image

    out = tmp_path / "out"
    cfg = family_config(
        family, out, dummy_data_dir,
        train={"gradient_checkpointing": True, "mixed_precision": "bf16"},
        ema={"enabled": True, "decay": 0.9},
        checkpointing={"every_steps": 2},
        validation={"prompts": ["a red circle", "a blue square"], "num_inference_steps": 2},
    )  # fmt: skip
    train(cfg)
    name = family_class(family).denoiser
    assert (out / "checkpoint-2" / f"{name}_ema").is_dir()
    with Image.open(out / "samples" / "step-2.png") as grid:
        assert grid.width == 2 * 64
    card = (out / "README.md").read_text()
    assert f"from diffusers import {PIPELINE_CLASSES[family]}" in card


@pytest.mark.parametrize(
    ("family", "setting", "message"),
    [
        ("sd", "train.timestep_sampling=mode", "train.timestep_sampling: applies to flow"),
        ("sdxl", "train.loss_weighting=cosmap", "train.loss_weighting: applies to flow"),
        ("sd", "train.guidance_scale=1.0", "train.guidance_scale: is Flux's"),
        ("sd3", "train.snr_gamma=5", "train.snr_gamma: does not apply to model family sd3"),
        ("flux", "train.prediction_type=v_prediction", "train.prediction_type: does not apply"),
        ("flux", "model.drop_t5=true", "model.drop_t5: applies to sd3 only"),
        ("sdxl", "model.max_sequence_length=64", "model.max_sequence_length: sets the T5"),
        ("flux", "train.logit_mean=1.0", "train.logit_mean: is a parameter of train.timestep"),
        ("sd3", "train.mode_scale=1.0", "train.mode_scale: is a parameter of"),
        ("sd3", "model.max_sequence_length=600", "600 is more than the 512 T5 tokens"),
        ("sd", "model.family=flux", "is a StableDiffusionPipeline (model family sd), not a flux"),
    ],
)
def test_options_of_another_family_are_refused(
    family: str, setting: str, message: str, tmp_path: Path, dummy_data_dir: Path,
    builtin_cache: Path, capsys,
) -> None:  # fmt: skip
    from difftrain.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{pretrained: '{BUILTIN_OF[family]}'}}\n"
                      f"data: {{train_dir: '{dummy_data_dir}', resolution: 64}}\n")  # fmt: skip
    code = main(["train", "--config", str(config), "--output-dir", str(tmp_path / "o"),
                 "--set", setting])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert message in err[0]
    assert not (tmp_path / "o").exists()


def test_family_names_agree_everywhere_they_are_listed() -> None:
    import typing

    from difftrain.cli import build_parser
    from difftrain.config.schema import ModelConfig
    from difftrain.training.run_dir import FINAL_OUTPUTS

    hint = typing.get_type_hints(ModelConfig)["family"]
    assert set(typing.get_args(typing.get_args(hint)[0])) == set(PIPELINE_CLASSES)
    # Every component folder a family saves is a name the run owns (and may replace).
    for family in FAMILIES:
        layout = family_class(family)()
        assert set(layout.required_parts()) <= set(FINAL_OUTPUTS), family
    sizes = next(
        action.choices
        for action in build_parser()
        ._subparsers._group_actions[0]
        .choices["make-tiny-model"]
        ._actions
        if action.dest == "size"
    )
    assert set(sizes) == set(BUILTINS)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"text_encoder": ["transformers", "pipeline"]}, "not a transformers PreTrainedModel"),
        ({"unet": ["diffusers", "utils"]}, "not a diffusers ModelMixin"),
        ({"text_encoder": ["transformers", "CLIPTokenizer"]}, "not a transformers PreTrained"),
        ({"tokenizer": ["transformers", "AutoModel"]}, "PreTrainedTokenizerBase"),
        ({"_class_name": "StableDiffusionXLPipeline"}, None),
    ],
    ids=["callable", "module", "tokenizer-as-encoder", "model-as-tokenizer", "family-clash"],
)
def test_model_index_classes_must_be_of_the_right_kind(
    edit: dict, message: str | None, tmp_path: Path, tiny_model_dir: Path, dummy_data_dir: Path,
    capsys,
) -> None:  # fmt: skip
    import json
    import shutil

    from difftrain.cli import main

    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, **edit}))
    config = tmp_path / "c.yaml"
    family = "\n  family: sd" if message is None else ""
    config.write_text(
        f"model:\n  pretrained: '{model}'{family}\ndata: {{train_dir: '{dummy_data_dir}'}}\n"
    )
    code = main(["train", "--config", str(config), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    expected = message or "is a StableDiffusionXLPipeline (model family sdxl), not a sd pipeline"
    assert expected in err[0]
    assert not (tmp_path / "o").exists()
