"""Bad-input cases for training data: images, captions, metadata files."""

from __future__ import annotations

import json
import struct
import zlib

from bad_input_table import Case, Workspace


def png_bytes(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG written by hand: its header may claim what PIL would never write (a size the
    data does not fill, 16-bit RGB). `rows` is the raw scanlines, without filter bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    stride = len(rows) // height if rows else 0
    scanlines = b"".join(b"\0" + rows[i * stride : (i + 1) * stride] for i in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(scanlines if rows else b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def huge_png(width: int = 40000, height: int = 40000) -> bytes:
    """A few hundred bytes whose header claims width x height 8-bit grey pixels."""
    return png_bytes(width, height, 8, 0, b"")


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


def _huge_image(ws: Workspace) -> Case:
    folder = ws.folder("huge")
    (folder / "x.png").write_bytes(huge_png())
    (folder / "x.txt").write_text("a caption")
    return Case(
        ["train", "--config", ws.data_config("h", data_dir=folder), *ws.out],
        "has 1600000000 pixels, more than the limit",
    )


def _outside_image(ws: Workspace) -> str:
    """A real image outside the data folder, so only the file_name check can stop it."""
    outside = ws.root / "outside.png"
    outside.write_bytes((ws.data / "00000.png").read_bytes())
    return str(outside)


def _metadata_case(ws: Workspace, name: str, file_name: str, expected: str) -> Case:
    folder = ws.folder(name)
    row = {"file_name": file_name, "text": "a caption"}
    (folder / "metadata.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
    return Case(
        ["train", "--config", ws.data_config(name, data_dir=folder), *ws.out],
        f"metadata.jsonl line 1: file_name {file_name!r} {expected}",
    )


def _escaping_file_name(ws: Workspace) -> Case:
    _outside_image(ws)
    return _metadata_case(ws, "escape", "../outside.png", "points outside data.train_dir")


def _absolute_file_name(ws: Workspace) -> Case:
    return _metadata_case(ws, "absolute", _outside_image(ws), "is an absolute path")


def _latin1_metadata(ws: Workspace) -> Case:
    folder = ws.folder("latin1")
    (folder / "00000.png").write_bytes((ws.data / "00000.png").read_bytes())
    # What Excel on Windows writes for "Save as CSV".
    (folder / "metadata.csv").write_bytes("file_name,text\n00000.png,un café\n".encode("cp1252"))
    return Case(
        ["train", "--config", ws.data_config("l1", data_dir=folder), *ws.out],
        "metadata.csv line 2: not UTF-8 text; save it as UTF-8",
    )


def _utf16_caption(ws: Workspace) -> Case:
    folder = ws.folder("utf16")
    (folder / "x.png").write_bytes((ws.data / "00000.png").read_bytes())
    # What Notepad wrote as "Unicode" for years.
    (folder / "x.txt").write_bytes("a caption".encode("utf-16"))
    return Case(
        ["train", "--config", ws.data_config("u16", data_dir=folder), *ws.out],
        "x.txt line 1: not UTF-8 text; save it as UTF-8",
    )


CASES = {
    "data: missing folder": _missing_data_folder,
    "data: no images": _no_images,
    "data: image without caption": _no_caption,
    "data: corrupt image": _corrupt_image,
    "data: truncated image": _truncated_image,
    "data: image over the pixel limit": _huge_image,
    "data: metadata file_name escapes the folder": _escaping_file_name,
    "data: absolute file_name": _absolute_file_name,
    "data: metadata not UTF-8": _latin1_metadata,
    "data: caption file not UTF-8": _utf16_caption,
}
