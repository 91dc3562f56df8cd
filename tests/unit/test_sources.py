"""Training data from a `datasets` dataset and from WebDataset tar shards: the same images
in the same order train exactly as the image folder does, and bad sources are one line."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from test_families import family_config

from difftrain.data.folder import scan_image_folder
from difftrain.training.trainer import train


def make_dataset(folder: Path, out: Path) -> Path:
    import datasets

    datasets.disable_progress_bars()
    examples = scan_image_folder(folder)
    table = datasets.Dataset.from_dict(
        {"img": [str(e.image_path) for e in examples], "caption": [e.caption for e in examples]}
    ).cast_column("img", datasets.Image())
    table.save_to_disk(str(out))
    return out


def make_shards(folder: Path, out: Path, per_shard: int = 3) -> str:
    examples = scan_image_folder(folder)
    out.mkdir()
    for start in range(0, len(examples), per_shard):
        with tarfile.open(out / f"shard-{start // per_shard:03d}.tar", "w") as tar:
            for number, example in enumerate(examples[start : start + per_shard], start):
                key = f"{number:06d}"
                tar.add(example.image_path, arcname=f"{key}.png")
                payload = json.dumps({"text": example.caption}).encode()
                info = tarfile.TarInfo(f"{key}.json")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    last = (len(examples) - 1) // per_shard
    return str(out / f"shard-{{000..{last:03d}}}.tar")


def run(tmp_path: Path, name: str, data_dir: Path, **data):
    cfg = family_config("sd", tmp_path / name, data_dir, data=data, train={"max_steps": 6},
                        checkpointing={"every_steps": 3})  # fmt: skip
    return train(cfg)


@pytest.mark.parametrize("source", ["dataset", "shards"])
def test_a_source_trains_exactly_as_the_same_images_in_a_folder(
    source: str, tmp_path: Path, dummy_data_dir: Path, builtin_cache
) -> None:
    folder = run(tmp_path, "folder", dummy_data_dir)
    if source == "dataset":
        data = {"train_dir": None, "dataset": str(make_dataset(dummy_data_dir, tmp_path / "ds")),
                "image_column": "img", "caption_column": "caption"}  # fmt: skip
    else:
        data = {"train_dir": None, "shards": make_shards(dummy_data_dir, tmp_path / "shards")}
    other = run(tmp_path, f"{source}-run", dummy_data_dir, **data)
    assert other.losses == folder.losses
    # And resumes like any run: 3 + 3 steps equal the 6 straight.
    cfg = family_config("sd", tmp_path / "resumed", dummy_data_dir, data=data,
                        train={"max_steps": 3}, checkpointing={"every_steps": 3})  # fmt: skip
    train(cfg)
    cfg = family_config("sd", tmp_path / "resumed", dummy_data_dir, data=data,
                        train={"max_steps": 6, "resume_from_checkpoint": "latest"},
                        checkpointing={"every_steps": 3})  # fmt: skip
    assert train(cfg).losses == folder.losses[3:]


def test_shards_and_datasets_work_with_the_latent_cache(
    tmp_path: Path, dummy_data_dir: Path, builtin_cache
) -> None:
    shards = make_shards(dummy_data_dir, tmp_path / "shards")
    cache = {"center_crop": True, "cache_latents": True, "cache_dir": str(tmp_path / "cache")}
    first = run(tmp_path, "a", dummy_data_dir, train_dir=None, shards=shards, **cache)
    again = run(tmp_path, "b", dummy_data_dir, train_dir=None, shards=shards, **cache)
    assert first.losses == again.losses


def bad_shard_without_caption(tmp_path: Path, data: Path) -> str:
    (tmp_path / "s").mkdir()
    with tarfile.open(tmp_path / "s" / "a.tar", "w") as tar:
        tar.add(next(data.glob("*.png")), arcname="x.png")
    return f"shards: '{tmp_path / 's' / 'a.tar'}'"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp, data: f"shards: '{tmp}/none-{{0..3}}.tar'", "data.shards: "),
        (bad_shard_without_caption, "sample 'x' has an image but no .txt or .json caption"),
        (
            lambda tmp, data: f"dataset: '{make_dataset(data, tmp / 'ds')}', image_column: pic",
            "data.image_column: 'pic' is not a column of",
        ),
        (lambda tmp, data: f"train_dir: '{data}', shards: x.tar", "and data.shards both name"),
    ],
    ids=["missing-shard", "no-caption", "no-column", "two-sources"],
)
def test_a_bad_source_is_one_line(
    make, message: str, tmp_path: Path, dummy_data_dir: Path, capsys
) -> None:
    from difftrain.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{{make(tmp_path, dummy_data_dir)}}}\n")
    code = main(["train", "--config", str(config), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert message in err[0]
    assert not (tmp_path / "o").exists()


def test_several_sources_with_repeats_form_one_dataset(
    tmp_path: Path, dummy_data_dir: Path, builtin_cache
) -> None:
    import shutil

    from difftrain.config import dump_config
    from difftrain.config.loader import load_config
    from difftrain.data.sources import scan_sources

    shards = make_shards(dummy_data_dir, tmp_path / "shards")
    small = tmp_path / "small"
    small.mkdir()
    for image in sorted(dummy_data_dir.glob("*.png"))[:2]:
        shutil.copy(image, small / image.name)
        (small / image.with_suffix(".txt").name).write_text("a sks shape")
    sources = [{"shards": shards}, {"train_dir": str(small), "repeats": 3}]
    cfg = family_config("sd", tmp_path / "o", dummy_data_dir,
                        data={"train_dir": None, "sources": sources}, train={"max_steps": 3})  # fmt: skip
    examples = scan_sources(cfg.data)
    assert len(examples) == 8 + 3 * 2
    assert [e.caption for e in examples[8:]] == ["a sks shape"] * 6
    result = train(cfg)
    assert result.steps == 3
    # The resolved config (a list of sections) reads back as the same config.
    dump_config(cfg, tmp_path / "again.yaml")
    assert load_config(tmp_path / "again.yaml") == cfg


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        ("[{train_dir: a, shards: b}]", "data.sources[0].train_dir: and data.sources[0].shards"),
        ("[{train_dir: a, repeat: 2}]", "data.sources[0].repeat: unknown key"),
        ("[{repeats: 2}]", "data.sources[0].train_dir: is required"),
        ("[{train_dir: a, repeats: 0}]", "data.sources[0].repeats: must be > 0"),
    ],
)
def test_bad_sources_name_the_item(sources: str, message: str, tmp_path: Path) -> None:
    from difftrain.config.loader import load_config
    from difftrain.errors import ConfigError

    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{sources: {sources}}}\n")
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(config)


def test_a_dataset_row_without_an_image_is_one_line(tmp_path: Path, capsys) -> None:
    import datasets

    from difftrain.cli import main

    datasets.disable_progress_bars()
    table = datasets.Dataset.from_dict({"image": [None], "text": ["a"]})
    table.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "ds"))
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{dataset: '{tmp_path / 'ds'}'}}\n")
    code = main(["train", "--config", str(config), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "data.dataset: cannot read the image of row 0 of" in err[0], err
    assert not (tmp_path / "o").exists()


def test_an_unreadable_member_or_row_names_its_source_item_and_fix(
    tmp_path: Path, dummy_data_dir: Path
) -> None:
    import datasets

    from difftrain.config.schema import DataConfig, SourceConfig
    from difftrain.data.sources import scan_sources
    from difftrain.errors import UserError

    (tmp_path / "s").mkdir()
    with tarfile.open(tmp_path / "s" / "a.tar", "w") as tar:
        for name, payload in (("x.png", b"garbage"), ("x.txt", b"a caption")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    shards = SourceConfig(shards=str(tmp_path / "s" / "a.tar"))
    member = (
        f"cannot read image x.png in shard {tmp_path / 's' / 'a.tar'} (not an image PIL can "
        "read); fix or remove that member of the shard, or set data.on_bad_image: skip"
    )
    messages = []
    for _ in range(2):
        with pytest.raises(UserError) as error:
            scan_sources(DataConfig(shards=shards.shards))
        messages.append(str(error.value))
    assert messages[0] == messages[1]  # no memory address: the same text every run
    assert messages[0].startswith(f"data.shards: {member}")
    folder = SourceConfig(train_dir=str(dummy_data_dir))
    with pytest.raises(UserError) as error:
        scan_sources(DataConfig(sources=[folder, shards]))
    assert str(error.value).startswith(f"data.sources[1].shards: {member}")

    datasets.disable_progress_bars()
    table = datasets.Dataset.from_dict({"image": [None], "text": ["a"]})
    table.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "ds"))
    rows = SourceConfig(dataset=str(tmp_path / "ds"))
    with pytest.raises(UserError) as error:
        scan_sources(DataConfig(sources=[folder, rows]))
    assert str(error.value).startswith(
        f"data.sources[1].dataset: cannot read the image of row 0 of {tmp_path / 'ds'} "
        "(column 'image' holds no image); fix or drop that row, or set data.on_bad_image: skip"
    )


def test_checks_while_reading_a_source_name_its_item(tmp_path: Path, dummy_data_dir: Path) -> None:
    from difftrain.config.schema import DataConfig, SourceConfig
    from difftrain.data.sources import scan_sources
    from difftrain.errors import UserError

    folder = SourceConfig(train_dir=str(dummy_data_dir))
    gone = tmp_path / "data.shards" / "gone"  # `data.` inside a path is left as it is
    cases = [
        (SourceConfig(train_dir=str(gone)), f"train_dir: folder {gone} does not exist"),
        (SourceConfig(shards=str(tmp_path / "no-{0..1}.tar")), f"shards: {tmp_path}/no-0.tar"),
        (SourceConfig(dataset=str(tmp_path / "no-ds")), "dataset: cannot open"),
    ]
    for broken, message in cases:
        with pytest.raises(UserError) as error:
            scan_sources(DataConfig(sources=[folder, broken]))
        assert str(error.value).startswith(f"data.sources[1].{message}"), error.value


def test_an_image_that_fails_only_when_decoded_names_its_shard(tmp_path: Path) -> None:
    """Decoding happens mid-run (or for data.on_bad_image: skip's list): the line names the
    shard member and its source key, and holds no in-memory file's address."""
    from difftrain.data.sources import TarMember
    from difftrain.data.transforms import load_rgb, oriented_size
    from difftrain.errors import UserError

    shard = tmp_path / "a.tar"
    with tarfile.open(shard, "w") as tar:
        info = tarfile.TarInfo("x.png")
        info.size = 7
        tar.addfile(info, io.BytesIO(b"not png"))
    member = TarMember(shard=shard, offset=512, size=7, name="x.png")
    for read in (load_rgb, oriented_size):
        with pytest.raises(UserError) as error:
            read(member)
        assert str(error.value).startswith(f"data.shards: cannot read image x.png in shard {shard}")
        assert "0x" not in str(error.value)


def test_a_hub_dataset_id_trains_offline_from_the_hugging_face_cache(
    tmp_path: Path, dummy_data_dir: Path, hub_cache
) -> None:
    """A dataset repository already in the cache (as `hf download --repo-type dataset`
    leaves it: parquet files under a snapshot) trains by its id with HF_HUB_OFFLINE=1."""
    import datasets

    from difftrain.training.metrics import read_metrics

    examples = scan_image_folder(dummy_data_dir)
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    datasets.Dataset.from_dict(
        {"image": [str(e.image_path) for e in examples], "text": [e.caption for e in examples]}
    ).cast_column("image", datasets.Image()).to_parquet(str(repo / "data" / "train.parquet"))
    hub_cache.install("acme/shapes", repo, kind="datasets")
    config = tmp_path / "hub.yaml"
    config.write_text(
        "model: {pretrained: 'builtin:tiny'}\n"
        "data: {dataset: acme/shapes, resolution: 64, center_crop: true, random_flip: false}\n"
        "train: {max_steps: 6, batch_size: 2, learning_rate: 1.0e-3, deterministic: true}\n"
        "checkpointing: {every_steps: 3}\n"
    )
    out = tmp_path / "hub"
    done = hub_cache.run_python(
        "import sys; from difftrain.cli import main; "
        f"sys.exit(main(['train', '--config', {str(config)!r}, '--output-dir', {str(out)!r}]))"
    )
    assert done.returncode == 0, done.stderr
    folder = run(tmp_path, "folder", dummy_data_dir, center_crop=True, random_flip=False)
    hub_losses = [row["loss"] for row in read_metrics(out / "metrics.jsonl")]
    assert hub_losses == pytest.approx(folder.losses, rel=1e-5)
