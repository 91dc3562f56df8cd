"""What a run records about itself (data_manifest.json, timings.json), and `difftrain
reproduce`, which trains it again and compares step by step.

    pytest tests/unit/test_reproduce.py -q
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from test_families import family_config

from difftrain.cli import main
from difftrain.config import config_from_dict
from difftrain.data.manifest import build_manifest, write_manifest
from difftrain.data.sources import scan_sources
from difftrain.training.trainer import train


@pytest.fixture
def data(tmp_path: Path, dummy_data_dir: Path) -> Path:
    """A private copy of the dummy data: some tests edit it."""
    return Path(shutil.copytree(dummy_data_dir, tmp_path / "data"))


def cosine_run(tmp_path: Path, data: Path, steps: int = 4) -> Path:
    """A finished tiny run whose learning rate changes every step (so a reproduction that
    shortened the schedule to --steps would differ)."""
    out = tmp_path / "run"
    cfg = family_config(
        "sd",
        out,
        data,
        train={"max_steps": steps, "lr_scheduler": "cosine", "lr_warmup_steps": 1},
    )
    train(cfg)
    return out


def test_a_run_records_its_files_and_its_times(tmp_path: Path, data: Path, builtin_cache) -> None:
    out = cosine_run(tmp_path, data, steps=2)
    manifest = json.loads((out / "data_manifest.json").read_text())
    images = sorted(data.glob("*.png"))
    assert manifest["sources"] == [{"kind": "folder", "id": str(data), "repeats": 1, "files": 8}]
    assert [f["path"] for f in manifest["files"]] == [str(p) for p in images]
    for entry, image in zip(manifest["files"], images, strict=True):
        assert entry["size"] == image.stat().st_size
        assert entry["sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
    timings = json.loads((out / "timings.json").read_text())
    parts = [timings[k] for k in ("startup_s", "training_s", "saving_s")]
    assert all(part > 0 for part in parts), timings
    assert sum(parts) == pytest.approx(timings["total_s"], abs=0.01)


def test_the_manifest_says_which_source_each_image_came_from(tmp_path: Path, data: Path) -> None:
    nested = Path(shutil.copytree(data, data / "nested"))  # inside the first source's folder
    cfg = config_from_dict({"data": {"sources": [
        {"train_dir": str(data), "repeats": 3}, {"train_dir": str(nested)},
        {"train_dir": str(data)},  # the same folder again: its own entries
    ]}})  # fmt: skip
    manifest = build_manifest(scan_sources(cfg.data), cfg.data)
    assert [s["files"] for s in manifest["sources"]] == [8, 8, 8]  # repeats list an image once
    assert [s["repeats"] for s in manifest["sources"]] == [3, 1, 1]
    assert [f["source"] for f in manifest["files"]] == [0] * 8 + [1] * 8 + [2] * 8
    assert all(Path(f["path"]).parent == nested for f in manifest["files"][8:16])


def test_a_resume_reuses_the_recorded_hashes_of_unchanged_files(
    tmp_path: Path, data: Path, monkeypatch
) -> None:
    from difftrain.data import manifest as manifest_module

    cfg = config_from_dict({"data": {"train_dir": str(data)}})
    examples = scan_sources(cfg.data)
    first = write_manifest(tmp_path, examples, cfg.data, cfg.validation)
    hashed = []
    real = manifest_module.image_hash
    monkeypatch.setattr(manifest_module, "image_hash", lambda p: hashed.append(p) or real(p))
    assert write_manifest(tmp_path, examples, cfg.data, cfg.validation) == first
    assert hashed == []
    # Other pixels, same size, the old mtime put back: the ctime still tells.
    image = sorted(data.glob("*.png"))[3]
    stat, content = image.stat(), bytearray(image.read_bytes())
    content[-20] ^= 0xFF
    image.write_bytes(bytes(content))
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = write_manifest(tmp_path, examples, cfg.data, cfg.validation)
    assert hashed == [image]
    assert again["files"][3]["sha256"] == hashlib.sha256(bytes(content)).hexdigest()


def test_shard_members_and_dataset_rows_are_recorded_and_resumes_reuse_member_hashes(
    tmp_path: Path, data: Path, monkeypatch
) -> None:
    from test_sources import make_dataset, make_shards

    from difftrain.data.sources import TarMember

    pattern = make_shards(data, tmp_path / "shards")
    table = make_dataset(data, tmp_path / "table")
    dataset = {"dataset": str(table), "image_column": "img", "caption_column": "caption"}
    cfg = config_from_dict({"data": {"sources": [{"shards": pattern}, dataset]}})
    examples = scan_sources(cfg.data)
    first = write_manifest(tmp_path, examples, cfg.data, cfg.validation)
    member = examples[0].image_path
    with open(member.shard, "rb") as shard:
        shard.seek(member.offset)
        expected = hashlib.sha256(shard.read(member.size)).hexdigest()
    assert first["files"][0]["sha256"] == expected and first["files"][0]["size"] == member.size
    assert [s["files"] for s in first["sources"]] == [8, 8]
    opened = []
    real = TarMember.open
    monkeypatch.setattr(TarMember, "open", lambda self: opened.append(self) or real(self))
    assert write_manifest(tmp_path, examples, cfg.data, cfg.validation) == first
    assert opened == []  # every shard unchanged: no member read again


def test_reproduce_says_identical_for_a_whole_run_and_for_its_first_steps(
    tmp_path: Path, data: Path, builtin_cache, capsys
) -> None:
    out = cosine_run(tmp_path, data)
    before = (out / "metrics.jsonl").read_bytes()
    assert main(["reproduce", str(out)]) == 0
    assert (
        capsys.readouterr()
        .out.strip()
        .endswith(f"identical: 4 steps of {out / 'metrics.jsonl'} reproduced")
    )
    assert main(["reproduce", str(out), "--steps", "3"]) == 0  # step 3's rate is the 4-step one
    assert "identical: 3 steps" in capsys.readouterr().out
    assert (out / "metrics.jsonl").read_bytes() == before  # the run itself is left alone


def test_reproduce_names_the_first_step_and_key_that_differ(
    tmp_path: Path, data: Path, builtin_cache, capsys
) -> None:
    out = cosine_run(tmp_path, data, steps=3)
    metrics = out / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    trained = records[1]["loss"]
    records[1]["loss"] = edited = trained + 1e-7  # as a change in the numerics would leave it
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["reproduce", str(out), "--output-dir", str(tmp_path / "again")]) == 1
    verdict = capsys.readouterr().out.strip().splitlines()[-1]
    assert verdict == f"differs at step 2: loss {edited!r} in the run, {trained!r} reproduced"
    assert (tmp_path / "again" / "metrics.jsonl").is_file()  # --output-dir keeps it


def test_forced_reproduction_on_edited_data_differs(
    tmp_path: Path, data: Path, builtin_cache, capsys
) -> None:
    out = cosine_run(tmp_path, data, steps=2)
    from PIL import Image

    for image in sorted(data.glob("*.png")):  # every one: step 1 must see an edited image
        with Image.open(image) as opened:
            edited = opened.convert("RGB").transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        edited.save(image)
    assert main(["reproduce", str(out)]) == 2
    assert "has other content" in capsys.readouterr().err
    assert main(["reproduce", str(out), "--force"]) == 1
    assert "differs at step 1" in capsys.readouterr().out


def test_a_torn_last_metrics_line_is_left_out(
    tmp_path: Path, data: Path, builtin_cache, capsys
) -> None:
    out = cosine_run(tmp_path, data, steps=2)
    with open(out / "metrics.jsonl", "a") as metrics:
        metrics.write('{"step": 3, "lo')  # a kill mid-line
    assert main(["reproduce", str(out)]) == 0
    assert "identical: 2 steps" in capsys.readouterr().out
