"""The latent and text-embedding cache in training: a cached run is the uncached run, and no
change to what an entry depends on (the image's pixels, the resolution, the crop, the VAE)
ever reuses an old entry.

The store itself (keys, checksums, atomic writes) is tested in test_cache_store.py.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_families import family_config

from difftrain.data.cache import TensorCache
from difftrain.training.trainer import train

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
CACHED = {"center_crop": True, "cache_latents": True, "cache_text_embeddings": True}


@pytest.fixture
def data(tmp_path: Path, dummy_data_dir: Path) -> Path:
    """A private copy of the images: some tests edit them."""
    return Path(shutil.copytree(dummy_data_dir, tmp_path / "data"))


def run(tmp_path: Path, name: str, data: Path, family: str = "sd", **data_cfg):
    cfg = family_config(
        family, tmp_path / name, data,
        data={"center_crop": True, "random_flip": False, **data_cfg},
        train={"max_steps": 6}, checkpointing={"every_steps": 3},
    )  # fmt: skip
    return train(cfg)


def cache_dir(tmp_path: Path) -> str:
    return str(tmp_path / "cache")


def weights(out: Path, name: str = WEIGHTS) -> dict[str, torch.Tensor]:
    return load_file(out / name)


def assert_same_run(a, b, exact: bool) -> None:
    if exact:
        assert a.losses == b.losses
    else:
        assert a.losses == pytest.approx(b.losses, rel=1e-5)
    wa, wb = weights(a.output_dir), weights(b.output_dir)
    for name, value in wa.items():
        if exact:
            assert torch.equal(value, wb[name]), name
        else:
            torch.testing.assert_close(value, wb[name], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_a_cached_run_is_the_uncached_run(
    family: str, tmp_path: Path, data: Path, builtin_cache
) -> None:
    cache = cache_dir(tmp_path)
    plain = run(tmp_path, "plain", data, family)
    filling = run(tmp_path, "filling", data, family, **CACHED, cache_dir=cache)
    reading = run(tmp_path, "reading", data, family, **CACHED, cache_dir=cache)
    name = "transformer/diffusion_pytorch_model.safetensors" if family == "flux" else WEIGHTS
    assert plain.losses == pytest.approx(filling.losses, rel=1e-5)
    assert filling.losses == reading.losses  # every entry read back as it was computed
    a, b = weights(filling.output_dir, name), weights(reading.output_dir, name)
    assert all(torch.equal(a[k], b[k]) for k in a)
    info = TensorCache(Path(cache)).info()
    assert info["latent"]["entries"] == 8 and info["text"]["entries"] >= 1


def test_random_flip_caches_both_orientations(tmp_path: Path, data: Path, builtin_cache) -> None:
    cache = cache_dir(tmp_path)
    cfg = family_config(
        "sd", tmp_path / "o", data, data={**CACHED, "cache_dir": cache, "random_flip": True},
        train={"max_steps": 32},
    )  # fmt: skip
    train(cfg)
    # 8 images, 8 epochs: both orientations of every image are seen (for this seed).
    assert TensorCache(Path(cache)).info()["latent"]["entries"] == 16


def test_an_edited_image_under_the_same_name_is_encoded_again(
    tmp_path: Path, data: Path, builtin_cache
) -> None:
    cache = cache_dir(tmp_path)
    before = run(tmp_path, "before", data, **CACHED, cache_dir=cache)
    image = sorted(data.glob("*.png"))[0]
    stat = image.stat()
    with Image.open(image) as original:
        edited = Image.eval(original.convert("RGB"), lambda v: 255 - v)
    edited.save(image)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same name, same mtime
    after = run(tmp_path, "after", data, **CACHED, cache_dir=cache)
    plain = run(tmp_path, "plain", data)
    assert after.losses != before.losses
    assert after.losses == pytest.approx(plain.losses, rel=1e-5)
    assert TensorCache(Path(cache)).info()["latent"]["entries"] == 9


@pytest.mark.parametrize(
    "change", [{"resolution": 32}, {"center_crop": False}], ids=["resolution", "crop"]
)
def test_a_new_resolution_never_reads_old_entries(
    change: dict, tmp_path: Path, data: Path, builtin_cache
) -> None:
    cache = cache_dir(tmp_path)
    run(tmp_path, "first", data, **CACHED, cache_dir=cache)
    if "center_crop" in change:
        # A random crop cannot be cached at all: refused before anything runs.
        with pytest.raises(Exception, match="data.cache_latents: needs data.center_crop: true"):
            run(tmp_path, "second", data, **{**CACHED, **change}, cache_dir=cache)
        return
    second = run(tmp_path, "second", data, **CACHED, **change, cache_dir=cache)
    plain = run(tmp_path, "plain", data, **change)
    assert second.losses == pytest.approx(plain.losses, rel=1e-5)
    assert TensorCache(Path(cache)).info()["latent"]["entries"] == 16


def test_another_vae_at_the_same_path_never_reads_old_entries(
    tmp_path: Path, data: Path, tiny_model_dir: Path
) -> None:
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    cache = cache_dir(tmp_path)

    def with_model(name: str, **data_cfg):
        cfg = family_config(
            "sd", tmp_path / name, data, model={"pretrained": str(model)},
            data={"center_crop": True, "random_flip": False, **data_cfg},
            train={"max_steps": 3},
        )  # fmt: skip
        return train(cfg)

    with_model("first", **CACHED, cache_dir=cache)
    vae_file = model / "vae" / "diffusion_pytorch_model.safetensors"
    vae = load_file(vae_file)
    from safetensors.torch import save_file

    save_file({k: v * 1.01 if v.is_floating_point() else v for k, v in vae.items()}, vae_file)
    second = with_model("second", **CACHED, cache_dir=cache)
    plain = with_model("plain")
    assert second.losses == pytest.approx(plain.losses, rel=1e-5)
    # 3 steps of 2 images with each VAE: none of the second run's entries was the first's.
    assert TensorCache(Path(cache)).info()["latent"]["entries"] == 12


def test_a_corrupt_entry_is_recomputed_with_a_warning(
    tmp_path: Path, data: Path, builtin_cache, caplog
) -> None:
    cache = cache_dir(tmp_path)
    first = run(tmp_path, "first", data, **CACHED, cache_dir=cache)
    entries = sorted((tmp_path / "cache" / "latent").rglob("*.safetensors"))
    raw = bytearray(entries[0].read_bytes())
    raw[-3] ^= 0xFF  # one byte of tensor data
    entries[0].write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="difftrain"):
        second = run(tmp_path, "second", data, **CACHED, cache_dir=cache)
    assert any(str(entries[0].name) in record.getMessage() for record in caplog.records)
    # Recomputed alone rather than in its batch of 2: equal up to float rounding.
    assert second.losses == pytest.approx(first.losses, rel=1e-5)
    assert (tmp_path / "cache" / "latent").exists() and entries[0].is_file()  # written again


def test_resume_with_the_cache_is_bit_exact(tmp_path: Path, data: Path, builtin_cache) -> None:
    cache = cache_dir(tmp_path)
    straight = run(tmp_path, "straight", data, **CACHED, cache_dir=cache)
    cfg = family_config(
        "sd", tmp_path / "resumed", data,
        data={**CACHED, "cache_dir": cache, "random_flip": False},
        train={"max_steps": 3}, checkpointing={"every_steps": 3},
    )  # fmt: skip
    train(cfg)
    cfg = family_config(
        "sd", tmp_path / "resumed", data,
        data={**CACHED, "cache_dir": cache, "random_flip": False},
        train={"max_steps": 6, "resume_from_checkpoint": "latest"},
        checkpointing={"every_steps": 3},
    )  # fmt: skip
    resumed = train(cfg)
    assert resumed.losses == straight.losses[3:]
    a, b = weights(straight.output_dir), weights(resumed.output_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_text_embeddings_of_a_training_text_encoder_are_refused(data: Path) -> None:
    from difftrain.errors import ConfigError

    with pytest.raises(ConfigError, match="data.cache_text_embeddings: cannot cache"):
        family_config(
            "sd", data / "o", data, data={"cache_text_embeddings": True},
            lora={"enabled": True, "train_text_encoder": True},
        )  # fmt: skip


def test_cache_build_fills_what_the_run_reads_then_info_and_clear(
    tmp_path: Path, data: Path, builtin_cache, capsys, caplog
) -> None:
    from difftrain.cli import main

    cache = tmp_path / "cache"
    (cache / "notes.txt").parent.mkdir(parents=True)
    (cache / "notes.txt").write_text("mine")
    config = tmp_path / "c.yaml"
    config.write_text(
        "model: {pretrained: 'builtin:tiny-sdxl'}\n"
        f"data: {{train_dir: '{data}', resolution: 64, center_crop: true, random_flip: true,\n"
        f"       cache_latents: true, cache_text_embeddings: true, cache_dir: '{cache}'}}\n"
        "train: {max_steps: 8, batch_size: 2}\ncheckpointing: {every_steps: 0}\n"
    )
    assert main(["cache", "build", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "latent cache: 0 read, 16 computed" in out  # 8 images, both orientations
    assert main(["cache", "info", "--config", str(config)]) == 0
    assert "latent: 16 entries" in capsys.readouterr().out
    with caplog.at_level(logging.INFO, logger="difftrain"):
        assert main(["train", "--config", str(config), "--output-dir", str(tmp_path / "o")]) == 0
    summary = [r.getMessage() for r in caplog.records if "latent cache:" in r.getMessage()]
    assert summary and "0 computed; text cache: 16 read, 0 computed" in summary[-1]
    assert main(["cache", "clear", "--cache-dir", str(cache)]) == 0
    assert "removed" in capsys.readouterr().out
    assert TensorCache(cache).info() == {} and (cache / "notes.txt").read_text() == "mine"


def test_cache_build_refuses_a_config_that_caches_nothing(
    tmp_path: Path, data: Path, capsys
) -> None:
    from difftrain.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{train_dir: '{data}'}}\n")
    assert main(["cache", "build", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "caches nothing; set data.cache_latents" in err[0]


def test_sd3_text_entries_key_the_t5_length_even_without_t5(
    tmp_path: Path, data: Path, builtin_cache
) -> None:
    cache = {"cache_text_embeddings": True, "cache_dir": cache_dir(tmp_path)}
    for name, length in (("a", 20), ("b", 24)):
        cfg = family_config(
            "sd3", tmp_path / name, data, data=cache, train={"max_steps": 2},
            model={"drop_t5": True, "max_sequence_length": length},
        )  # fmt: skip
        assert train(cfg).steps == 2  # the second run never reads the first's (shorter) rows
    assert TensorCache(Path(cache["cache_dir"])).info()["text"]["entries"] >= 2


def test_text_cache_with_shuffled_tags_is_refused(data: Path) -> None:
    from difftrain.errors import ConfigError

    with pytest.raises(ConfigError, match="data.cache_text_embeddings: would miss almost"):
        family_config("sd", data / "o", data,
                      data={"cache_text_embeddings": True, "shuffle_tags": True})  # fmt: skip
