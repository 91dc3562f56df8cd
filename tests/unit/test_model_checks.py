"""The model pre-flight (`check_model_source`) and what `load_components` reads.

The bad-input table runs each refusal through the CLI; these tests cover what it cannot:
models that must pass, hub ids through the offline cache, and how weights are loaded.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from difftrain.config.schema import ModelConfig
from difftrain.errors import UserError
from difftrain.models.loading import check_model_source, load_components
from difftrain.models.pipeline_checks import first_line


@pytest.fixture
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny pipeline, free to break."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def edit_json(path: Path, **changes: object) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_the_tiny_model_passes(tiny_model_dir: Path) -> None:
    assert check_model_source(ModelConfig(pretrained="builtin:tiny")) == str(tiny_model_dir)


def test_a_training_output_passes(model_copy: Path) -> None:
    # What `difftrain train` leaves beside the pipeline is no reason to refuse it.
    (model_copy / "config.yaml").write_text("train: {seed: 0}\n")
    (model_copy / "logs").mkdir()
    (model_copy / "logs" / "train.log").write_text("step 1\n")
    (model_copy / "unet_ema").mkdir()
    assert check_model_source(ModelConfig(pretrained=str(model_copy))) == str(model_copy)


def test_stable_diffusion_1_safety_checker_entry_is_diffusers_own_code(model_copy: Path) -> None:
    # SD 1.x names its safety checker's library "stable_diffusion": diffusers.pipelines code.
    edit_json(
        model_copy / "model_index.json",
        safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
        feature_extractor=["transformers", "CLIPImageProcessor"],
    )
    check_model_source(ModelConfig(pretrained=str(model_copy)))


def test_component_class_the_library_lacks_is_refused(model_copy: Path) -> None:
    edit_json(model_copy / "model_index.json", text_encoder=["transformers", "CLIPTextModelXYZ"])
    with pytest.raises(UserError, match="a class transformers does not have: it is custom code"):
        check_model_source(ModelConfig(pretrained=str(model_copy)))


def test_every_refusal_names_the_setting_and_the_model(model_copy: Path) -> None:
    edit_json(model_copy / "model_index.json", _class_name="KandinskyV22Pipeline")
    with pytest.raises(UserError) as caught:
        check_model_source(ModelConfig(pretrained=str(model_copy)), label="--model")
    assert str(caught.value).startswith(f"--model: {model_copy} is a KandinskyV22Pipeline")


def test_load_components_refuses_an_unknown_scheduler(model_copy: Path) -> None:
    # Without the pre-flight too: no silent fallback to a DDPM sampling scheduler.
    edit_json(model_copy / "scheduler" / "scheduler_config.json", _class_name="FancyScheduler")
    with pytest.raises(UserError, match="names scheduler class 'FancyScheduler'"):
        load_components(ModelConfig(pretrained=str(model_copy)))


def test_weights_load_as_safetensors_only_when_the_folder_has_them(
    model_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import diffusers
    import transformers

    seen: dict[str, object] = {}

    def spy(cls):
        original = cls.from_pretrained.__func__

        def from_pretrained(klass, source, **kwargs):
            seen[kwargs["subfolder"]] = kwargs.get("use_safetensors")
            return original(klass, source, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(from_pretrained))

    for cls in (diffusers.UNet2DConditionModel, diffusers.AutoencoderKL):
        spy(cls)
    spy(transformers.CLIPTextModel)
    # The VAE as a pickle only: it still loads, through the libraries' weights_only reader.
    vae = model_copy / "vae" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(vae), vae.with_suffix(".bin"))
    vae.unlink()
    load_components(ModelConfig(pretrained=str(model_copy)))
    assert seen == {"text_encoder": True, "vae": None, "unet": True}


def test_a_pickle_that_runs_code_is_refused_and_never_runs(model_copy: Path) -> None:
    marker = model_copy.parent / "pwned"

    class RunsCode:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    unet = model_copy / "unet"
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"conv_in.weight": RunsCode()}, unet / "diffusion_pytorch_model.bin")
    with pytest.raises(UserError, match="model.pretrained: could not load unet"):
        load_components(ModelConfig(pretrained=str(model_copy)))
    assert not marker.exists()


def test_first_line_keeps_the_line_a_list_introduces() -> None:
    error = RuntimeError("Error(s) in loading:\n\tsize mismatch for x.\n\tsize mismatch for y.")
    assert first_line(error) == "Error(s) in loading: size mismatch for x"
    assert first_line(OSError("no such file.\nmore")) == "no such file"


# --- hub ids, through an offline cache (child processes: HF_HUB_OFFLINE is read on import) ---


def check_hub_id(hub_cache, repo_id: str, revision: str | None = None):
    return hub_cache.run_python(
        "import sys\n"
        "from difftrain.config.schema import ModelConfig\n"
        "from difftrain.errors import UserError\n"
        "from difftrain.models.loading import check_model_source\n"
        "try:\n"
        f"    print(check_model_source(ModelConfig(pretrained={repo_id!r}, revision={revision!r})))\n"
        "except UserError as exc:\n"
        "    print('REFUSED', exc)\n"
    )


def test_cached_hub_model_passes_offline(tiny_model_dir: Path, hub_cache) -> None:
    hub_cache.install("some-org/tiny-sd", tiny_model_dir)
    result = check_hub_id(hub_cache, "some-org/tiny-sd")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "some-org/tiny-sd"


def test_cached_hub_model_with_custom_code_is_refused_offline(model_copy: Path, hub_cache) -> None:
    edit_json(model_copy / "model_index.json", unet=["my_module", "MyUNet"])
    hub_cache.install("some-org/custom", model_copy)
    result = check_hub_id(hub_cache, "some-org/custom")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(
        "REFUSED model.pretrained: some-org/custom: component unet is ['my_module', 'MyUNet']"
    ), result.stdout


def test_cached_hub_model_truncated_weights_are_refused_offline(
    model_copy: Path, hub_cache
) -> None:
    weights = model_copy / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    hub_cache.install("some-org/broken", model_copy)
    result = check_hub_id(hub_cache, "some-org/broken")
    assert "vae/diffusion_pytorch_model.safetensors is damaged or truncated" in result.stdout


def test_hub_revision_not_in_the_cache_is_refused_offline(tiny_model_dir: Path, hub_cache) -> None:
    hub_cache.install("some-org/tiny-sd", tiny_model_dir)
    result = check_hub_id(hub_cache, "some-org/tiny-sd", revision="v2")
    assert result.stdout.startswith("REFUSED model.pretrained: could not load 'some-org/tiny-sd'")
    assert "HF_HUB_OFFLINE" in result.stdout
