"""The final pipeline copies the base model's unchanged components instead of re-saving them:
the same pipeline as diffusers' save_pretrained writes, with the base model's files as they
are, and the slow way whenever the files cannot simply be copied."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_families import BUILTIN_OF, FAMILIES, family_config

from difftrain.models.loading import load_components, model_family
from difftrain.training import outputs
from difftrain.training.outputs import save_final_pipeline


def components_of(model: str, tmp_path: Path, data: Path, family: str = "sd", **model_cfg):
    cfg = family_config(family, tmp_path / "o", data, model={"pretrained": model, **model_cfg})
    return load_components(cfg.model, model_family(cfg.model, cfg.train))


def state(part) -> dict[str, torch.Tensor]:
    return part.state_dict() if isinstance(part, torch.nn.Module) else {}


def assert_same_pipeline(a: Path, b: Path) -> None:
    from diffusers import DiffusionPipeline

    index_a = json.loads((a / "model_index.json").read_text())
    assert index_a == json.loads((b / "model_index.json").read_text())
    # Dropped components (SD3 without T5) are null in the index and passed as None.
    absent = {k: None for k, v in index_a.items() if isinstance(v, list) and v[0] is None}
    pa = DiffusionPipeline.from_pretrained(a, **absent)
    pb = DiffusionPipeline.from_pretrained(b, **absent)
    for name, part in pa.components.items():
        other = pb.components[name]
        assert type(part) is type(other), name
        sa, sb = state(part), state(other)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name
        if hasattr(part, "model_max_length"):  # a tokenizer
            assert part("a red circle").input_ids == other("a red circle").input_ids


@pytest.mark.parametrize("family", FAMILIES)
def test_the_copied_pipeline_is_the_one_save_pretrained_writes(
    family: str, tmp_path: Path, dummy_data_dir: Path, builtin_cache, monkeypatch
) -> None:
    extra = {"drop_t5": True} if family == "sd3" else {}
    components = components_of(BUILTIN_OF[family], tmp_path, dummy_data_dir, family, **extra)
    with torch.no_grad():  # a denoiser unlike the base model's
        next(components.denoiser.parameters()).add_(1.0)
    fast, slow = tmp_path / "fast", tmp_path / "slow"
    fast.mkdir(), slow.mkdir()
    save_final_pipeline(components, components.denoiser, fast)
    monkeypatch.setattr(outputs, "_save_changed_parts", lambda *args: False)
    save_final_pipeline(components, components.denoiser, slow)
    assert_same_pipeline(fast, slow)
    # The unchanged components are the base model's own files, byte for byte.
    base = Path(components.source)
    tokenizer = base / "tokenizer" / "tokenizer_config.json"
    assert (fast / "tokenizer" / "tokenizer_config.json").read_bytes() == tokenizer.read_bytes()
    for weights in (base / "vae").glob("*.safetensors"):
        assert (fast / "vae" / weights.name).read_bytes() == weights.read_bytes()


def test_pickled_weights_are_converted_the_slow_way(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir: Path
) -> None:
    from transformers import CLIPTextModel

    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    encoder = CLIPTextModel.from_pretrained(model / "text_encoder")
    (model / "text_encoder" / "model.safetensors").unlink()
    torch.save(encoder.state_dict(), model / "text_encoder" / "pytorch_model.bin")
    components = components_of(str(model), tmp_path, dummy_data_dir)
    out = tmp_path / "out"
    out.mkdir()
    save_final_pipeline(components, components.denoiser, out)
    # The output holds safetensors only, as diffusers converts it.
    assert sorted(p.name for p in (out / "text_encoder").iterdir() if "model" in p.name) == [
        "model.safetensors"
    ]


def test_a_link_out_of_the_model_folder_is_never_copied(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir: Path
) -> None:
    secret = tmp_path / "secret.json"
    secret.write_text('{"token": "hf_private"}')
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    (model / "tokenizer" / "added_notes.json").symlink_to(secret)
    components = components_of(str(model), tmp_path, dummy_data_dir)
    out = tmp_path / "out"
    out.mkdir()
    save_final_pipeline(components, components.denoiser, out)
    assert (out / "model_index.json").is_file()
    assert not any("hf_private" in p.read_text(errors="ignore") for p in out.rglob("*.json"))


def test_a_hub_snapshot_copies_through_its_blob_links(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir: Path, monkeypatch
) -> None:
    """A hub cache snapshot is links into the repository's blobs/: inside the model, so
    copied (the denoiser is the only component serialised)."""
    repo = tmp_path / "hub" / "models--acme--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    for number, path in enumerate(sorted(p for p in tiny_model_dir.rglob("*") if p.is_file())):
        blob = repo / "blobs" / f"{number:04d}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(tiny_model_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    components = components_of(str(snapshot), tmp_path, dummy_data_dir)
    from diffusers import ModelMixin

    saved = []
    real_save = ModelMixin.save_pretrained
    monkeypatch.setattr(
        ModelMixin, "save_pretrained",
        lambda self, *a, **k: saved.append(type(self).__name__) or real_save(self, *a, **k),
    )  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    save_final_pipeline(components, components.denoiser, out)
    assert saved == ["UNet2DConditionModel"]
    assert not (out / "vae" / "diffusion_pytorch_model.safetensors").is_symlink()


def test_a_component_whose_weights_are_not_all_there_is_not_copied(tmp_path: Path) -> None:
    """A hub snapshot holds only what training loaded: a component it never loaded (SD's
    safety checker) may be there as its config alone, and must then be loaded the slow way."""
    from difftrain.training.pipeline_files import unchanged_component_files

    root = tmp_path / "model"
    for name, files in {
        "tokenizer": {"tokenizer_config.json": "{}", "vocab.json": "{}", "merges.txt": ""},
        "safety_checker": {"config.json": "{}"},
        "text_encoder": {"config.json": "{}", "model.safetensors.index.json": json.dumps(
            {"weight_map": {"a": "model-00001-of-00002.safetensors",
                            "b": "model-00002-of-00002.safetensors"}})},
    }.items():  # fmt: skip
        (root / name).mkdir(parents=True)
        for file, text in files.items():
            (root / name / file).write_text(text)
    assert unchanged_component_files(root, ["tokenizer"]) is not None
    assert unchanged_component_files(root, ["safety_checker"]) is None
    assert unchanged_component_files(root, ["text_encoder"]) is None  # a shard is missing
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        (root / "text_encoder" / shard).write_bytes(b"")
    files = unchanged_component_files(root, ["text_encoder"])
    assert files is not None and len(files["text_encoder"]) == 4
