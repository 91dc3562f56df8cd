"""Models: the generated tokenizer, the tiny pipelines, and loading from every kind of source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difftrain.errors import UserError
from difftrain.models.loading import resolve_pretrained
from difftrain.models.tiny import builtin_model_path, save_tiny_pipeline
from difftrain.models.tokenizer import CAPTION_WORDS


def test_tokenizer_spells_caption_words_as_single_tokens(tiny_model_dir: Path) -> None:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    ids = tokenizer("a red circle on a blue background").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert len(ids) == 2 + 7  # one token per word
    for word in CAPTION_WORDS:
        assert word in CAPTION_WORDS
        assert len(tokenizer(word).input_ids) == 3
    # Unknown words still tokenise, byte by byte, and decode back.
    text = "zyxw qq"
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text


def test_tiny_pipeline_layout(tiny_model_dir: Path) -> None:
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_model_dir / part).is_dir(), part
    assert (tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tiny_model_dir / "tokenizer" / "vocab.json").is_file()


def test_tiny_pipeline_loads_offline_and_generates(tiny_model_dir: Path, hub_cache) -> None:
    # A child process, so HF_HUB_OFFLINE=1 is set before huggingface_hub is imported.
    result = hub_cache.run_python(
        "import torch\n"
        "from diffusers import StableDiffusionPipeline\n"
        f"pipe = StableDiffusionPipeline.from_pretrained({str(tiny_model_dir)!r})\n"
        "image = pipe('a red circle', num_inference_steps=2,"
        " generator=torch.Generator().manual_seed(0)).images[0]\n"
        "print('OFFLINE', __import__('os').environ['HF_HUB_OFFLINE'], pipe.vae_scale_factor, image.size)\n"
    )
    assert result.returncode == 0, result.stderr
    assert "OFFLINE 1 8 (64, 64)" in result.stdout


def test_same_seed_same_weights(tmp_path: Path) -> None:
    a = save_tiny_pipeline(tmp_path / "a", seed=3)
    b = save_tiny_pipeline(tmp_path / "b", seed=3)
    c = save_tiny_pipeline(tmp_path / "c", seed=4)
    weights = "unet/diffusion_pytorch_model.safetensors"
    wa, wb, wc = (load_file(p / weights) for p in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_builtin_is_built_once_and_reused(builtin_cache: Path, tiny_model_dir: Path) -> None:
    stamp = (tiny_model_dir / "model_index.json").stat().st_mtime_ns
    assert builtin_model_path("builtin:tiny") == tiny_model_dir
    assert tiny_model_dir.is_relative_to(builtin_cache)
    assert (tiny_model_dir / "model_index.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "builtin:huge",
            "unknown built-in model 'builtin:huge'; use one of builtin:tiny, builtin:small",
        ),
        ("./no/such/model", "folder ./no/such/model does not exist"),
        ("/abs/missing", "folder /abs/missing does not exist"),
    ],
)
def test_resolve_pretrained_errors(name: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        resolve_pretrained(name)


def test_folder_without_model_index_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a diffusers pipeline folder"):
        resolve_pretrained(str(tmp_path))


def test_hub_id_loads_from_the_local_hub_cache(tiny_model_dir: Path, hub_cache) -> None:
    hub_cache.install("some-org/tiny-sd", tiny_model_dir)
    result = hub_cache.run_python(
        "from difftrain.models.loading import load_components\n"
        "from difftrain.config.schema import ModelConfig\n"
        "c = load_components(ModelConfig(pretrained='some-org/tiny-sd'))\n"
        "print(c.source, type(c.noise_scheduler).__name__, type(c.inference_scheduler).__name__,"
        " c.denoiser.config.cross_attention_dim == c.parts['text_encoder'].config.hidden_size)\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["some-org/tiny-sd", "DDPMScheduler", "PNDMScheduler", "True"]


def test_missing_hub_model_offline_is_one_clear_line(
    hub_cache, tmp_path: Path, dummy_data_dir: Path
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        f"model: {{pretrained: nobody/nothing}}\ndata: {{train_dir: {dummy_data_dir}}}\n"
    )
    result = hub_cache.run_python(
        "import sys\nfrom difftrain.cli import main\n"
        f"sys.exit(main(['train', '--config', {str(config)!r}, '--output-dir', {str(tmp_path / 'out')!r}]))"
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "model.pretrained: could not load" in lines[0] and "HF_HUB_OFFLINE" in lines[0]
