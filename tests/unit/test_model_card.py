"""The model card written into a run's output folder."""

from __future__ import annotations

from pathlib import Path

import yaml

from difftrain.training.model_card import write_model_card

SETTINGS = {"learning_rate": 1e-5, "batch_size": 2, "resolution": 512, "lr_scheduler": "cosine"}


def front_matter(text: str) -> dict:
    """The YAML between the first two `---` lines."""
    lines = text.splitlines()
    assert lines[0] == "---"
    end = lines.index("---", 1)
    return yaml.safe_load("\n".join(lines[1:end]))


def write(output_dir: Path, **overrides) -> str:
    kwargs = {
        "base_model": "runwayml/stable-diffusion-v1-5",
        "data_dir": "data/pokemon",
        "num_images": 833,
        "settings": SETTINGS,
        "final_loss": 0.123456789,
        "steps": 1000,
        "lora": False,
        "sample_grid": output_dir / "samples" / "step-1000.png",
        **overrides,
    }
    path = write_model_card(output_dir, **kwargs)
    assert path == output_dir / "README.md"
    return path.read_text(encoding="utf-8")


def test_full_fine_tune_card(tmp_path: Path) -> None:
    out = tmp_path / "run"
    text = write(out)
    meta = front_matter(text)
    assert meta["library_name"] == "diffusers"
    assert meta["base_model"] == "runwayml/stable-diffusion-v1-5"
    assert meta["tags"] == ["text-to-image", "diffusers", "stable-diffusion", "difftrain"]
    assert "833 images" in text
    assert "`data/pokemon`" in text
    assert "Steps trained: 1000" in text
    assert "Final loss: 0.123457" in text
    assert "![validation samples](samples/step-1000.png)" in text
    assert f'StableDiffusionPipeline.from_pretrained("{out.resolve()}")' in text
    assert "load_lora_weights" not in text


def test_lora_card(tmp_path: Path) -> None:
    out = tmp_path / "lora-run"
    text = write(out, lora=True)
    assert front_matter(text)["tags"][-1] == "lora"
    assert 'StableDiffusionPipeline.from_pretrained("runwayml/stable-diffusion-v1-5")' in text
    assert f'pipe.load_lora_weights("{out.resolve()}")' in text
    assert f'from_pretrained("{out.resolve()}")' not in text


def test_lora_card_on_a_single_file_base_loads_it_with_the_runs_config(tmp_path: Path) -> None:
    # Without config=, diffusers guesses a config repository on the Hub: offline, or for a
    # model the guess misses, the snippet would fail.
    out = tmp_path / "lora-run"
    base, config = str(tmp_path / "my model.safetensors"), str(tmp_path / "sdxl-configs")
    text = write(out, lora=True, base_model=base, single_file_config=config,
                 pipeline_class="StableDiffusionXLPipeline")  # fmt: skip
    snippet = f'StableDiffusionXLPipeline.from_single_file("{base}", config="{config}")'
    assert snippet in text
    text = write(out, lora=True, base_model=base, single_file_config="org/sdxl-base")
    assert f'from_single_file("{base}", config="org/sdxl-base")' in text


def test_settings_table(tmp_path: Path) -> None:
    text = write(tmp_path, settings={**SETTINGS, "prompts": ["a | b", "c"]})
    assert "| Setting | Value |" in text
    assert "| learning_rate | 1e-05 |" in text
    assert "| batch_size | 2 |" in text
    assert "| lr_scheduler | cosine |" in text
    assert "| prompts | a \\| b, c |" in text  # a pipe in a value does not split the cell


def test_no_loss_and_no_grid(tmp_path: Path) -> None:
    text = write(tmp_path, final_loss=None, sample_grid=None, steps=0, num_images=1, settings={})
    front_matter(text)
    assert "Final loss: n/a" in text
    assert "1 image)" in text
    assert "![" not in text
    assert "## Samples" not in text
    assert "## Settings" not in text


def test_relative_output_dir_gives_relative_link_and_absolute_load_path(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    text = write(Path("out"), sample_grid=Path("out/samples/step-5.png"))
    assert "](samples/step-5.png)" in text
    assert f'from_pretrained("{tmp_path.resolve() / "out"}")' in text


def test_local_base_model_is_kept_out_of_the_metadata(tmp_path: Path) -> None:
    # The Hub rejects a card whose base_model is not a model id.
    for base in ("builtin:tiny", str(tmp_path)):
        text = write(tmp_path / "out", base_model=base)
        assert "base_model" not in front_matter(text)
        assert f"`{base}`" in text


def test_rewrites_an_existing_card(tmp_path: Path) -> None:
    write(tmp_path, steps=10)
    text = write(tmp_path, steps=20)
    assert "Steps trained: 20" in text
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
