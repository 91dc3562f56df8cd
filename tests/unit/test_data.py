"""Data: folder layouts, captions, preprocessing, the resumable sample stream, dummy data."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import warnings
from functools import partial
from pathlib import Path

import pytest
import torch
from PIL import Image

from difftrain.config.schema import DataConfig
from difftrain.data.dataset import CaptionedImageDataset, build_dataloader
from difftrain.data.dummy import make_dummy_imagefolder
from difftrain.data.folder import Example, check_image_file, drop_unreadable, scan_image_folder
from difftrain.data.sampler import ResumableSampler, SampleKey
from difftrain.data.transforms import load_rgb, preprocess
from difftrain.errors import UserError


def image(path: Path, size=(40, 24), colour=(255, 0, 0)) -> Path:
    Image.new("RGB", size, colour).save(path)
    return path


def test_metadata_jsonl_layout(dummy_data_dir: Path) -> None:
    examples = scan_image_folder(dummy_data_dir)
    assert len(examples) == 8
    assert examples[0].image_path == dummy_data_dir / "00000.png"
    assert examples[0].caption.startswith("a ") and "background" in examples[0].caption


def test_caption_column_is_configurable(tmp_path: Path) -> None:
    image(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "prompt": "x"}))
    assert scan_image_folder(tmp_path, "prompt")[0].caption == "x"
    with pytest.raises(UserError, match="set data.caption_column to one of: prompt"):
        scan_image_folder(tmp_path, "text")


def test_metadata_csv_layout(tmp_path: Path) -> None:
    image(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_text("file_name,text\na.png,a red thing\n")
    assert scan_image_folder(tmp_path)[0].caption == "a red thing"


def test_caption_file_pairs(tmp_path: Path) -> None:
    image(tmp_path / "b.png")
    image(tmp_path / "a.jpg")
    (tmp_path / "a.txt").write_text("first\n")
    (tmp_path / "b.txt").write_text("second")
    examples = scan_image_folder(tmp_path)
    assert [(e.image_path.name, e.caption) for e in examples] == [
        ("a.jpg", "first"),
        ("b.png", "second"),
    ]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: None, "no images in"),
        (lambda d: image(d / "a.png"), "has no caption file a.txt"),
        (lambda d: (d / "metadata.jsonl").write_text("{not json\n"), "line 1: invalid JSON"),
        (lambda d: (d / "metadata.jsonl").write_text('{"text": "x"}\n'), "no 'file_name' column"),
        (
            lambda d: (d / "metadata.jsonl").write_text('{"file_name": "gone.png", "text": "x"}\n'),
            "gone.png does not exist",
        ),
    ],
)
def test_bad_folders_name_the_problem(tmp_path: Path, setup, message: str) -> None:
    setup(tmp_path)
    with pytest.raises(UserError, match=message):
        scan_image_folder(tmp_path)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="data.train_dir: folder .* does not exist"):
        scan_image_folder(tmp_path / "nope")


def test_corrupt_and_truncated_images_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="cannot read image .*junk.png"):
        load_rgb(tmp_path / "junk.png")
    whole = image(tmp_path / "whole.png", size=(64, 64)).read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserError, match="cut.png"):
        load_rgb(tmp_path / "cut.png")


def test_preprocess_shape_range_and_crop() -> None:
    source = Image.new("RGB", (80, 40), (255, 255, 255))
    source.paste((0, 0, 0), (0, 0, 40, 40))  # left half black
    rng = random.Random(0)
    pixels = preprocess(source, 32, center_crop=True, random_flip=False, rng=rng)
    assert pixels.shape == (3, 32, 32)
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    # Centre crop of a 64x32 resize: the left 16 columns black, the right 16 white.
    assert pixels[:, :, :14].max() < -0.9 and pixels[:, :, 18:].min() > 0.9


def test_flip_and_random_crop_follow_the_rng() -> None:
    source = Image.new("RGB", (48, 32), (255, 255, 255))
    source.paste((0, 0, 0), (0, 0, 8, 32))
    a = preprocess(source, 32, center_crop=False, random_flip=True, rng=random.Random(5))
    b = preprocess(source, 32, center_crop=False, random_flip=True, rng=random.Random(5))
    assert torch.equal(a, b)
    outputs = {
        preprocess(source, 32, center_crop=False, random_flip=True, rng=random.Random(s))
        .sum()
        .item()
        for s in range(20)
    }
    assert len(outputs) > 1  # crops and flips do vary with the seed


def test_sampler_epochs_are_permutations() -> None:
    keys = list(itertools.islice(iter(ResumableSampler(5, seed=3)), 15))
    for epoch in range(3):
        assert sorted(k.index for k in keys[epoch * 5 : epoch * 5 + 5]) == [0, 1, 2, 3, 4]
    assert len({k.augment_seed for k in keys}) == 15


def test_sampler_resumes_the_same_stream() -> None:
    full = list(itertools.islice(iter(ResumableSampler(7, seed=1)), 30))
    resumed = list(itertools.islice(iter(ResumableSampler(7, seed=1, start_position=11)), 19))
    assert resumed == full[11:]


def test_sampler_shards_interleave_to_the_single_process_stream() -> None:
    full = list(itertools.islice(iter(ResumableSampler(6, seed=2)), 12))
    rank0 = list(itertools.islice(iter(ResumableSampler(6, seed=2, rank=0, world_size=2)), 6))
    rank1 = list(itertools.islice(iter(ResumableSampler(6, seed=2, rank=1, world_size=2)), 6))
    assert [k for pair in zip(rank0, rank1, strict=False) for k in pair] == full


def test_different_seeds_give_different_orders() -> None:
    a = [k.index for k in itertools.islice(iter(ResumableSampler(50, seed=0)), 50)]
    b = [k.index for k in itertools.islice(iter(ResumableSampler(50, seed=1)), 50)]
    assert a != b


def test_dataset_items_and_loader(dummy_data_dir: Path, tiny_model_dir: Path) -> None:
    from transformers import CLIPTokenizer

    from difftrain.models.families.sd import StableDiffusion

    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    cfg = DataConfig(train_dir=str(dummy_data_dir), resolution=32, random_flip=True)
    tokenize = partial(StableDiffusion().tokenize, {"tokenizer": tokenizer})
    dataset = CaptionedImageDataset(scan_image_folder(dummy_data_dir), tokenize, cfg)
    item = dataset[SampleKey(0, 123)]
    assert item["pixel_values"].shape == (3, 32, 32)
    assert item["tokens.tokenizer"].shape == (tokenizer.model_max_length,)
    assert torch.equal(item["pixel_values"], dataset[SampleKey(0, 123)]["pixel_values"])
    # The dummy images are 64 px squares: the original size as read, a crop inside the
    # 32 px resize (which is the whole image).
    assert item["original_size"].tolist() == [64, 64]
    assert item["crop_top_left"].tolist() == [0, 0]
    batch = next(iter(build_dataloader(dataset, batch_size=3, seed=0)))
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert batch["tokens.tokenizer"].shape == (3, tokenizer.model_max_length)
    assert batch["original_size"].shape == batch["crop_top_left"].shape == (3, 2)


def _tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def test_dummy_data_is_deterministic_and_varied(tmp_path: Path) -> None:
    a = make_dummy_imagefolder(tmp_path / "a", 6, 32)
    b = make_dummy_imagefolder(tmp_path / "b", 6, 32)
    assert _tree_digest(a) == _tree_digest(b)
    captions = [e.caption for e in scan_image_folder(a)]
    assert len(set(captions)) == 6
    assert Image.open(a / "00000.png").size == (32, 32)
    # Re-running into its own folder is fine (idempotent).
    make_dummy_imagefolder(a, 6, 32)
    assert _tree_digest(a) == _tree_digest(b)


def test_dummy_data_refuses_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        make_dummy_imagefolder(tmp_path, 2, 32)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    assert not (tmp_path / "metadata.jsonl").exists()


def test_worker_processes_give_the_same_batches(dummy_data_dir: Path, tiny_model_dir: Path) -> None:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    batches = []
    for workers in (0, 2):
        cfg = DataConfig(
            train_dir=str(dummy_data_dir), resolution=32, random_flip=True, num_workers=workers
        )
        dataset = CaptionedImageDataset(scan_image_folder(dummy_data_dir), tokenizer, cfg)
        loader = iter(build_dataloader(dataset, batch_size=3, seed=7, start_position=5))
        batches.append([next(loader)["pixel_values"] for _ in range(3)])
    assert all(torch.equal(a, b) for a, b in zip(batches[0], batches[1], strict=True))


def test_a_bad_image_in_a_worker_process_is_still_one_clean_line(
    tmp_path: Path, dummy_data_dir: Path, tiny_model_dir: Path
) -> None:
    import shutil

    from transformers import CLIPTokenizer

    data = tmp_path / "data"
    shutil.copytree(dummy_data_dir, data)
    examples = scan_image_folder(data)
    (data / "00000.png").write_bytes(b"broken after the scan")  # only decoding can find it
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    cfg = DataConfig(train_dir=str(data), resolution=32, num_workers=1)
    dataset = CaptionedImageDataset(examples, tokenizer, cfg)
    loader = build_dataloader(dataset, batch_size=8, seed=0)
    with pytest.raises(UserError) as error:
        next(iter(loader))
    message = str(error.value)
    assert message.startswith("data.train_dir: cannot read image") and "00000.png" in message
    assert "Traceback" not in message and "DataLoader worker" not in message


def _outside_and_folder(tmp_path: Path) -> Path:
    """A data folder `tmp_path/data`, with a real image beside it that file_name can reach."""
    image(tmp_path / "x.png")
    folder = tmp_path / "data"
    (folder / "a").mkdir(parents=True)
    return folder


def _metadata_jsonl(folder: Path, *rows: dict) -> None:
    text = "".join(json.dumps(row) + "\n" for row in rows)
    (folder / "metadata.jsonl").write_text(text, encoding="utf-8")


@pytest.mark.parametrize(
    ("file_name", "message"),
    [
        ("../x.png", "points outside data.train_dir"),
        ("a/../../x.png", "points outside data.train_dir"),
        ("..\\x.png", "points outside data.train_dir"),
        ("a\\..\\..\\x.png", "points outside data.train_dir"),
        ("..", "points outside data.train_dir"),
        ("/abs/x.png", "is an absolute path"),
        ("\\abs\\x.png", "is an absolute path"),
        ("C:/x.png", "is an absolute path"),
        ("c:x.png", "is an absolute path"),
        ("x.png\0.txt", "contains a NUL byte"),
        ("a/..", "names no file"),
        ("", "names no file"),
    ],
)
def test_file_name_must_stay_inside_the_folder(tmp_path: Path, file_name: str, message) -> None:
    folder = _outside_and_folder(tmp_path)
    if file_name.startswith("/abs"):
        file_name = str(tmp_path / "x.png")  # a real file, so only the check can refuse it
    _metadata_jsonl(
        folder, {"file_name": "a.png", "text": "ok"}, {"file_name": file_name, "text": "x"}
    )
    image(folder / "a.png")
    with pytest.raises(UserError, match=f"metadata.jsonl line 2: file_name .* {message}"):
        scan_image_folder(folder)


def test_csv_file_name_is_checked_too(tmp_path: Path) -> None:
    folder = _outside_and_folder(tmp_path)
    (folder / "metadata.csv").write_text("file_name,text\n\n../x.png,a caption\n")
    with pytest.raises(UserError, match="metadata.csv line 3: file_name '../x.png' points out"):
        scan_image_folder(folder)


@pytest.mark.parametrize("value", [3, None, ["a.png"]])
def test_file_name_must_be_text(tmp_path: Path, value) -> None:
    _metadata_jsonl(tmp_path, {"file_name": value, "text": "x"})
    with pytest.raises(UserError, match="line 1: file_name must be text") as error:
        scan_image_folder(tmp_path)
    assert str(error.value).endswith(f"got {value!r}")


def test_file_names_inside_the_folder_and_symlinks_still_work(tmp_path: Path) -> None:
    folder = _outside_and_folder(tmp_path)
    image(folder / "a" / "b.png")
    (folder / "link").symlink_to(tmp_path)  # the user's own choice: followed as usual
    names = ["a/b.png", "a\\b.png", "./a/b.png", "a/../a/b.png", "link/x.png"]
    _metadata_jsonl(folder, *({"file_name": name, "text": name} for name in names))
    paths = [e.image_path for e in scan_image_folder(folder)]
    assert paths[:4] == [folder / "a" / "b.png"] * 4
    assert paths[4] == folder / "link" / "x.png"


def test_a_utf8_bom_is_accepted(tmp_path: Path) -> None:
    image(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_text("file_name,text\na.png,café\n", encoding="utf-8-sig")
    assert scan_image_folder(tmp_path)[0].caption == "café"
    (tmp_path / "metadata.csv").unlink()
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "é"}', "utf-8-sig")
    assert scan_image_folder(tmp_path)[0].caption == "é"
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "a.txt").write_text("thé\n", encoding="utf-8-sig")
    assert scan_image_folder(tmp_path)[0].caption == "thé"


@pytest.mark.parametrize("name", ["metadata.jsonl", "metadata.csv", "a.txt"])
def test_text_that_is_not_utf8_names_the_file_and_line(tmp_path: Path, name: str) -> None:
    image(tmp_path / "a.png")
    good = {"metadata.jsonl": '{"file_name": "a.png", "text": "x"}', "metadata.csv": "a,b"}
    (tmp_path / name).write_bytes(good.get(name, "").encode() + "\nun café\n".encode("latin-1"))
    with pytest.raises(UserError, match=f"{name} line 2: not UTF-8 text; save it as UTF-8"):
        scan_image_folder(tmp_path)


def test_json_lines_split_only_at_newlines(tmp_path: Path) -> None:
    image(tmp_path / "a.png")
    _metadata_jsonl(tmp_path, {"file_name": "a.png", "text": "one\u2028two"})
    (tmp_path / "metadata.jsonl").write_text(
        (tmp_path / "metadata.jsonl").read_text().replace("\\u2028", "\u2028")
    )
    assert scan_image_folder(tmp_path)[0].caption == "one\u2028two"


@pytest.mark.parametrize(("size", "pixels"), [(40000, 1600000000), (10000, 100000000)])
def test_images_over_the_pixel_limit_are_refused(tmp_path: Path, size: int, pixels: int) -> None:
    """40000^2 is past PIL's error threshold; 10000^2 only past its warning threshold."""
    from bad_inputs_data import huge_png

    path = tmp_path / "huge.png"
    path.write_bytes(huge_png(size, size))
    filters = list(warnings.filters)
    message = f"image .*huge.png has {pixels} pixels, more than the limit of .*; downscale it"
    with pytest.raises(UserError, match=message):
        check_image_file(path)
    with pytest.raises(UserError, match=message):
        load_rgb(path)
    assert warnings.filters == filters  # refused locally, the process's filters unchanged


def test_skip_mode_drops_an_image_over_the_pixel_limit(tmp_path: Path) -> None:
    from bad_inputs_data import huge_png

    (tmp_path / "huge.png").write_bytes(huge_png())
    image(tmp_path / "fine.png")
    examples = [Example(tmp_path / "huge.png", "a"), Example(tmp_path / "fine.png", "b")]
    kept, skipped = drop_unreadable(examples)
    assert kept == examples[1:]
    assert [path for path, _ in skipped] == [tmp_path / "huge.png"]
    assert "1600000000 pixels" in skipped[0][1]


def test_tag_options_shuffle_and_drop_tags_reproducibly_keeping_the_first() -> None:
    from difftrain.data.captions import transform_caption

    caption = "sks dog, red, sitting, outdoors, grass, sunny"

    def draw(seed: int, **options) -> str:
        settings = {"shuffle_tags": False, "keep_tokens": 1, "tag_dropout": 0.0, **options}
        return transform_caption(caption, random.Random(seed), **settings)

    assert draw(0) == caption  # all off: untouched, nothing drawn
    shuffled = [draw(seed, shuffle_tags=True) for seed in range(20)]
    assert all(s.startswith("sks dog, ") for s in shuffled)
    assert all(sorted(s.split(", ")) == sorted(caption.split(", ")) for s in shuffled)
    assert len(set(shuffled)) > 5 and shuffled == [draw(s, shuffle_tags=True) for s in range(20)]
    dropped = [draw(seed, tag_dropout=0.5).split(", ") for seed in range(50)]
    assert all(tags[0] == "sks dog" for tags in dropped)
    assert 1.5 < sum(len(tags) - 1 for tags in dropped) / 50 < 3.5  # about half of 5 kept
