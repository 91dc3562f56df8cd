"""`difftrain sample` on the tiny model: an image comes out, a LoRA changes it, and a failed
save leaves nothing behind. (Refused inputs are in the bad-input table, `sample: ...`.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from difftrain.cli import main
from difftrain.models.families.sd import StableDiffusion


def sample(model: Path, output: Path, *extra: str) -> int:
    return main(
        ["sample", "--model", str(model), "--prompt", "a red circle on a blue background",
         "--steps", "2", "--height", "64", "--width", "64", "--seed", "3", "--device", "cpu",
         "--output", str(output), *extra]
    )  # fmt: skip


def pixel_bytes(path: Path) -> bytes:
    with Image.open(path) as image:
        return image.tobytes()


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LoRA weights for the tiny UNet, saved as training saves them, with non-zero up weights
    (fresh adapters are zero there and would change nothing)."""
    from diffusers import UNet2DConditionModel

    from difftrain.config.schema import LoraConfig
    from difftrain.models.lora import add_lora_adapters, save_lora_weights

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    add_lora_adapters(unet, {}, LoraConfig(enabled=True))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    folder = tmp_path_factory.mktemp("lora")
    save_lora_weights(folder, StableDiffusion(), unet)
    return folder


def test_sample_writes_the_image_and_nothing_else(
    tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    output = tmp_path / "new" / "folder" / "image.png"
    assert sample(tiny_model_dir, output) == 0
    assert capsys.readouterr().out.strip() == f"wrote {output}"
    with Image.open(output) as image:
        assert (image.format, image.size) == ("PNG", (64, 64))
    assert [p.name for p in output.parent.iterdir()] == ["image.png"]  # no temp file left


def test_sample_format_follows_the_extension(tiny_model_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "image.JPG"
    assert sample(tiny_model_dir, output) == 0
    with Image.open(output) as image:
        assert image.format == "JPEG"


def test_lora_changes_the_image_and_is_reproducible(
    tiny_model_dir: Path, lora_dir: Path, tmp_path: Path
) -> None:
    paths = {name: tmp_path / f"{name}.png" for name in ("base", "base2", "lora", "file")}
    assert sample(tiny_model_dir, paths["base"]) == 0
    assert sample(tiny_model_dir, paths["base2"]) == 0
    assert sample(tiny_model_dir, paths["lora"], "--lora", str(lora_dir)) == 0
    weights = lora_dir / "pytorch_lora_weights.safetensors"
    assert sample(tiny_model_dir, paths["file"], "--lora", str(weights)) == 0
    pixels = {name: pixel_bytes(path) for name, path in paths.items()}
    assert pixels["base"] == pixels["base2"]  # same seed, same image
    assert pixels["base"] != pixels["lora"]
    assert pixels["lora"] == pixels["file"]  # the folder or its file: the same LoRA


def test_failed_save_leaves_the_old_image_and_no_half_file(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    output = tmp_path / "image.png"
    output.write_bytes(b"the old image")

    def disk_full(self, fp, format=None, **params):
        fp.write(b"half an image")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    assert sample(tiny_model_dir, output) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"difftrain: error: --output {output}: could not write the image")
    assert "No space left on device" in err and len(err.splitlines()) == 1
    assert output.read_bytes() == b"the old image"
    assert [p.name for p in tmp_path.iterdir()] == ["image.png"]
