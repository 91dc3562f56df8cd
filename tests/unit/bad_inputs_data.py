"""Bad-input cases for training data: images, captions, metadata files."""

from __future__ import annotations

from bad_input_table import Case, Workspace


def _no_caption(ws: Workspace) -> Case:
    folder = ws.folder("no_caption")
    (folder / "x.png").write_bytes((ws.data / "00000.png").read_bytes())
    return Case(
        ["train", "--config", ws.data_config("c", data_dir=folder), *ws.out],
        "has no caption file x.txt",
    )


def _corrupt_image(ws: Workspace) -> Case:
    folder = ws.folder("corrupt")
    (folder / "x.png").write_bytes(b"garbage")
    (folder / "x.txt").write_text("a caption")
    return Case(
        ["train", "--config", ws.data_config("i", data_dir=folder), *ws.out], "cannot read image"
    )


def _truncated_image(ws: Workspace) -> Case:
    folder = ws.folder("truncated")
    whole = (ws.data / "00000.png").read_bytes()
    (folder / "x.png").write_bytes(whole[: len(whole) // 2])
    (folder / "x.txt").write_text("a caption")
    return Case(
        ["train", "--config", ws.data_config("ti", data_dir=folder), *ws.out], "cannot read image"
    )


def _no_images(ws: Workspace) -> Case:
    return Case(
        ["train", "--config", ws.data_config("e", data_dir=ws.folder("empty")), *ws.out],
        "no images in",
    )


def _missing_data_folder(ws: Workspace) -> Case:
    return Case(
        ["train", "--config", ws.data_config("d", data_dir=ws.root / "gone"), *ws.out],
        "data.train_dir: folder",
    )


CASES = {
    "data: missing folder": _missing_data_folder,
    "data: no images": _no_images,
    "data: image without caption": _no_caption,
    "data: corrupt image": _corrupt_image,
    "data: truncated image": _truncated_image,
}
