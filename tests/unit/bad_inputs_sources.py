"""Bad-input cases for the newer refusals: `datasets` datasets and WebDataset shards as training
data, lists of sources, aspect-ratio buckets, `difftrain cache build` and the cache options,
options of another model family, and model_index.json entries of the wrong kind.

Every model case trains on a copy of a tiny pipeline in the workspace, so the shared model
folder stays as it is even when a check misbehaves.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

from bad_input_table import Case, Workspace


def train(ws: Workspace, tag: str, data: str, extra: str = "") -> list[str]:
    """`difftrain train` with `data: {<data>, resolution: 64}` plus the `extra` sections."""
    config = ws.config(tag, f"data: {{{data}, resolution: 64}}\n" + extra)
    return ["train", "--config", config, *ws.out]


# --- data.dataset ------------------------------------------------------------------------------


def save_dataset(ws: Workspace, name: str, columns: dict[str, list], image: str | None) -> Path:
    """A `save_to_disk` folder of `columns`; `image` names the column cast to images."""
    import datasets

    datasets.disable_progress_bars()
    table = datasets.Dataset.from_dict(columns)
    if image is not None:
        table = table.cast_column(image, datasets.Image())
    table.save_to_disk(str(ws.root / name))
    return ws.root / name


def _pngs(ws: Workspace) -> list[str]:
    return [str(p) for p in sorted(ws.data.glob("*.png"))[:2]]


def _dataset_case(
    columns: Callable[[Workspace], dict], image: str | None, options: str, expected: str
) -> Callable[[Workspace], Case]:
    """`expected` may name the dataset folder as `{folder}`."""

    def build(ws: Workspace) -> Case:
        folder = save_dataset(ws, "ds", columns(ws), image)
        return Case(
            train(ws, "ds", f"dataset: '{folder}'{options}"), expected.format(folder=folder)
        )

    return build


def _dataset_missing(ws: Workspace) -> Case:
    return Case(
        train(ws, "dm", f"dataset: '{ws.root / 'no-ds'}'"),
        f"data.dataset: cannot open '{ws.root / 'no-ds'}'",
    )


def _dataset_not_saved(ws: Workspace) -> Case:
    folder = ws.folder("not-ds")
    (folder / "notes.txt").write_text("not a dataset\n")
    return Case(train(ws, "dn", f"dataset: '{folder}'"), f"data.dataset: cannot open '{folder}'")


# --- data.shards -------------------------------------------------------------------------------


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def _png(ws: Workspace) -> bytes:
    return (ws.data / "00000.png").read_bytes()


def _shard_case(
    members: Callable[[Workspace], dict[str, bytes]], expected: str
) -> Callable[[Workspace], Case]:
    """`expected` may name the shard file as `{shard}`."""

    def build(ws: Workspace) -> Case:
        shard = write_tar(ws.root / "shards" / "a.tar", members(ws))
        return Case(train(ws, "sh", f"shards: '{shard}'"), expected.format(shard=shard))

    return build


def _shards_match_nothing(ws: Workspace) -> Case:
    pattern = f"{ws.root / 'shards'}/none-{{0..3}}.tar"
    return Case(
        train(ws, "sn", f"shards: '{pattern}'"),
        f"data.shards: {ws.root / 'shards' / 'none-0.tar'} does not exist (4 of 4 shards missing)",
    )


def _shard_not_a_tar(ws: Workspace) -> Case:
    shard = ws.folder("shards") / "a.tar"
    shard.write_bytes(b"this is no tar file" * 40)
    return Case(train(ws, "st", f"shards: '{shard}'"), f"data.shards: cannot read shard {shard}")


def _shard_gzipped(ws: Workspace) -> Case:
    # `.tar.gz` shards are common; difftrain reads members at their offset, so plain tar only.
    plain = write_tar(ws.root / "plain" / "a.tar", {"x.png": _png(ws), "x.txt": b"a caption"})
    shard = ws.folder("shards") / "a.tar.gz"
    shard.write_bytes(gzip.compress(plain.read_bytes()))
    return Case(
        train(ws, "sg", f"shards: '{shard}'"), "it must be an uncompressed tar of WebDataset"
    )


# --- data.sources ------------------------------------------------------------------------------


def _sources_case(sources: str, expected: str) -> Callable[[Workspace], Case]:
    def build(ws: Workspace) -> Case:
        return Case(train(ws, "so", f"sources: {sources.format(data=ws.data)}"), expected)

    return build


def _second_source_broken(ws: Workspace) -> Case:
    shards = f"{ws.root / 'gone'}/s-{{0..1}}.tar"
    return Case(
        train(ws, "s2", f"sources: [{{train_dir: '{ws.data}'}}, {{shards: '{shards}'}}]"),
        f"data.sources[1].shards: {ws.root / 'gone' / 's-0.tar'} does not exist",
    )


def _second_folder_missing(ws: Workspace) -> Case:
    gone = ws.root / "gone"
    return Case(
        train(ws, "s3", f"sources: [{{train_dir: '{ws.data}'}}, {{train_dir: '{gone}'}}]"),
        f"data.sources[1].train_dir: folder {gone} does not exist",
    )


def _second_source_bad_row(ws: Workspace) -> Case:
    folder = save_dataset(ws, "ds", {"image": [*_pngs(ws), None], "text": ["a", "b", "c"]}, "image")
    return Case(
        train(ws, "s4", f"sources: [{{train_dir: '{ws.data}'}}, {{dataset: '{folder}'}}]"),
        f"data.sources[1].dataset: cannot read the image of row 2 of {folder} (column 'image' "
        "holds no image); fix or drop that row, or set data.on_bad_image: skip",
    )


def _second_source_corrupt_member(ws: Workspace) -> Case:
    shard = write_tar(ws.root / "shards" / "b.tar", {"y.png": b"garbage", "y.txt": b"a"})
    return Case(
        train(ws, "s5", f"sources: [{{train_dir: '{ws.data}'}}, {{shards: '{shard}'}}]"),
        f"data.sources[1].shards: cannot read image y.png in shard {shard} (not an image PIL "
        "can read); fix or remove that member of the shard, or set data.on_bad_image: skip",
    )


# --- buckets and the cache ---------------------------------------------------------------------

# All eight dummy images are 64x64, so they share one bucket: a batch of 9 never fills.
NO_FULL_BUCKET = "data.buckets: no aspect-ratio bucket holds 9 images"


def _buckets_never_fill(ws: Workspace) -> Case:
    return Case(
        train(ws, "b", f"train_dir: '{ws.data}', buckets: true", "train: {batch_size: 9}\n"),
        NO_FULL_BUCKET,
    )


def cache_build(ws: Workspace, tag: str, data: str, extra: str = "") -> list[str]:
    """`difftrain cache build` with the cache in the workspace, where the hashes see it."""
    cache = f"cache_dir: '{ws.root / 'cache'}'"
    config = ws.config(
        tag, f"data: {{train_dir: '{ws.data}', resolution: 64, {cache}, {data}}}\n" + extra
    )
    return ["cache", "build", "--config", config]


def _build_without_config(ws: Workspace) -> Case:
    return Case(["cache", "build"], "cache build: --config is required")


def _build_caches_nothing(ws: Workspace) -> Case:
    return Case(
        cache_build(ws, "cn", "center_crop: true"),
        "caches nothing; set data.cache_latents and/or data.cache_text_embeddings: true",
    )


def _build_buckets_never_fill(ws: Workspace) -> Case:
    argv = cache_build(
        ws,
        "cb",
        "center_crop: true, cache_latents: true, buckets: true",
        "train: {batch_size: 9}\n",
    )
    return Case(argv, NO_FULL_BUCKET)


def _build_missing_shards(ws: Workspace) -> Case:
    config = ws.config(
        "cs",
        f"data: {{shards: '{ws.root}/none.tar', cache_latents: true, "
        f"center_crop: true, cache_dir: '{ws.root / 'cache'}'}}\n",
    )
    return Case(
        ["cache", "build", "--config", config], f"data.shards: {ws.root}/none.tar does not exist"
    )


def _text_cache_training_encoder(ws: Workspace) -> Case:
    return Case(
        train(
            ws,
            "te",
            f"train_dir: '{ws.data}', cache_text_embeddings: true",
            "lora: {enabled: true, train_text_encoder: true}\n",
        ),
        "data.cache_text_embeddings: cannot cache the output of a text encoder that trains",
    )


def _text_cache_shuffled_tags(ws: Workspace) -> Case:
    return Case(
        cache_build(ws, "tt", "cache_text_embeddings: true, shuffle_tags: true"),
        "data.cache_text_embeddings: would miss almost every step with data.shuffle_tags",
    )


def _latent_cache_random_crop(ws: Workspace) -> Case:
    return Case(
        train(ws, "lc", f"train_dir: '{ws.data}', cache_latents: true, center_crop: false"),
        "data.cache_latents: needs data.center_crop: true",
    )


# --- model families and model_index.json -------------------------------------------------------


def model_copy(ws: Workspace, builtin: str | None = None) -> Path:
    """A copy of the shared tiny model, or of `builtin:<builtin>` (built once per cache)."""
    source = ws.model
    if builtin is not None:
        from difftrain.models.tiny import builtin_model_path

        source = builtin_model_path(f"builtin:{builtin}")
    copy = ws.root / "model"
    shutil.copytree(source, copy)
    return copy


def _model_case(
    model: str,
    expected: str,
    builtin: str | None = None,
    edit: Callable[[dict], None] | None = None,
) -> Callable[[Workspace], Case]:
    """Train a model copy (its model_index.json changed by `edit`) with `model: {<model>}`."""

    def build(ws: Workspace) -> Case:
        folder = model_copy(ws, builtin)
        if edit is not None:
            index = folder / "model_index.json"
            data = json.loads(index.read_text())
            edit(data)
            index.write_text(json.dumps(data))
        model_section = f"model: {{pretrained: '{folder}'{model}}}\n"
        return Case(train(ws, "m", f"train_dir: '{ws.data}'", model_section), expected)

    return build


CASES = {
    "dataset: missing folder": _dataset_missing,
    "dataset: folder not written by save_to_disk": _dataset_not_saved,
    "dataset: no image column": _dataset_case(
        lambda ws: {"img": _pngs(ws), "text": ["a", "b"]},
        "img",
        "",
        "data.image_column: 'image' is not a column of",
    ),
    "dataset: no caption column": _dataset_case(
        lambda ws: {"image": _pngs(ws), "caption": ["a", "b"]},
        "image",
        "",
        "data.caption_column: 'text' is not a column of",
    ),
    "dataset: image column holds text": _dataset_case(
        lambda ws: {"image": _pngs(ws), "text": ["a", "b"]},
        "image",
        ", image_column: text",
        "data.image_column: column 'text' of",
    ),
    "dataset: row without an image": _dataset_case(
        lambda ws: {"image": [None], "text": ["a"]},
        "image",
        "",
        "data.dataset: cannot read the image of row 0 of {folder} (column 'image' holds no "
        "image); fix or drop that row, or set data.on_bad_image: skip",
    ),
    "dataset: row with a corrupt image": _dataset_case(
        lambda ws: {"image": [{"bytes": b"garbage", "path": None}], "text": ["a"]},
        "image",
        "",
        "data.dataset: cannot read the image of row 0 of {folder} (not an image PIL can read); "
        "fix or drop that row",
    ),
    "shards: pattern matches nothing": _shards_match_nothing,
    "shards: not a tar": _shard_not_a_tar,
    "shards: gzip-compressed tar": _shard_gzipped,
    "shards: image without caption": _shard_case(
        lambda ws: {"x.png": _png(ws)}, "sample 'x' has an image but no .txt or .json caption"
    ),
    "shards: caption JSON broken": _shard_case(
        lambda ws: {"x.png": _png(ws), "x.json": b'{"text": '}, "x.json is not valid JSON"
    ),
    "shards: corrupt image": _shard_case(
        lambda ws: {"x.png": b"garbage", "x.txt": b"a caption"},
        "data.shards: cannot read image x.png in shard {shard} (not an image PIL can read); "
        "fix or remove that member of the shard, or set data.on_bad_image: skip",
    ),
    "data.sources: repeats 0": _sources_case(
        "[{{train_dir: '{data}', repeats: 0}}]", "data.sources[0].repeats: must be > 0"
    ),
    "data.sources: two kinds in one item": _sources_case(
        "[{{train_dir: '{data}', shards: x.tar}}]",
        "data.sources[0].train_dir: and data.sources[0].shards both name the training data",
    ),
    "data.sources: item names no source": _sources_case(
        "[{{repeats: 2}}]", "data.sources[0].train_dir: is required"
    ),
    "data.sources: second source broken": _second_source_broken,
    "data.sources: second folder missing": _second_folder_missing,
    "data.sources: second source has a row without an image": _second_source_bad_row,
    "data.sources: second source has a corrupt tar member": _second_source_corrupt_member,
    "buckets: none fills a batch": _buckets_never_fill,
    "cache build: no --config": _build_without_config,
    "cache build: caches nothing": _build_caches_nothing,
    "cache build: no bucket fills a batch": _build_buckets_never_fill,
    "cache build: shards missing": _build_missing_shards,
    "cache build: text cache with shuffled tags": _text_cache_shuffled_tags,
    "data.cache_text_embeddings: text encoder trains": _text_cache_training_encoder,
    "data.cache_latents: random crop": _latent_cache_random_crop,
    "family: drop_t5 on sd": _model_case(", drop_t5: true", "model.drop_t5: applies to sd3 only"),
    "family: max_sequence_length on sd": _model_case(
        ", max_sequence_length: 64", "model.max_sequence_length: sets the T5 prompt length"
    ),
    "family: max_sequence_length past sd3's": _model_case(
        ", max_sequence_length: 600", "600 is more than the 512 T5 tokens", builtin="tiny-sd3"
    ),
    "family: model.family contradicts the class": _model_case(
        ", family: sdxl", "is a StableDiffusionPipeline (model family sd), not a sdxl pipeline"
    ),
    "components: unet entry is a scheduler class": _model_case(
        "",
        "model_index.json entry 'unet' is ['diffusers', 'DDPMScheduler'], not a diffusers "
        "ModelMixin class",
        edit=lambda d: d.update(unet=["diffusers", "DDPMScheduler"]),
    ),
}
