"""Every image mode PIL opens becomes 8-bit RGB with the right values, or a clear refusal.

Each case writes a gradient in one mode to a format that keeps that mode, checks that PIL
reopens it in the mode we think (so the test exercises what users' files really give), and
compares `load_rgb` with values worked out by hand, within 1.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from bad_inputs_data import png_bytes
from PIL import Image

from difftrain.data.transforms import load_rgb, to_rgb
from difftrain.errors import UserError

WIDTH = 32
RAMP = np.linspace(0, 255, WIDTH).round().astype(np.uint8)
"""Columns 0..255; three rows, so alpha can vary per row."""
ALPHA = np.array([255, 128, 0], dtype=np.uint8)[:, None]
PALETTE = np.array([(i * 16, 255 - i * 16, (i * 40) % 256) for i in range(16)], dtype=np.uint8)


def rows(values: np.ndarray | int) -> np.ndarray:
    return np.broadcast_to(
        np.asarray(values, np.uint8) if isinstance(values, int) else values, (3, WIDTH)
    ).copy()


def grey(values: np.ndarray) -> np.ndarray:
    return np.repeat(rows(values)[..., None], 3, axis=2)


def onto_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(float)[..., None] / 255
    return np.rint(rgb * a + 255 * (1 - a))


def assert_loads_as(tmp_path: Path, image: Image.Image, name: str, mode: str, expected) -> None:
    path = tmp_path / name
    image.save(path)
    with Image.open(path) as reopened:
        assert reopened.mode == mode  # what PIL really gives for such a file
    loaded = load_rgb(path)
    assert loaded.mode == "RGB" and loaded.size == image.size
    difference = np.abs(np.asarray(loaded).astype(int) - np.asarray(expected).astype(int))
    assert difference.max() <= 1, np.asarray(loaded)[:, :, 0]


def _palette_image(indices: np.ndarray) -> Image.Image:
    image = Image.frombytes("P", (WIDTH, 3), indices.tobytes())
    image.putpalette(PALETTE.tobytes())
    return image


INDICES = rows(np.arange(WIDTH, dtype=np.uint8) % 16)
COLOURS = np.dstack([rows(RAMP), rows(255 - RAMP), rows(RAMP // 2)])
CMYK = np.dstack([rows(RAMP), np.zeros((3, WIDTH), np.uint8), rows(255 - RAMP), rows(RAMP // 4)])


def _cmyk_expected() -> np.ndarray:
    """The naive conversion, per channel: (255 - ink) * (255 - black) / 255."""
    ink, black = CMYK[..., :3].astype(float), CMYK[..., 3:].astype(float)
    return np.rint((255 - ink) * (255 - black) / 255)


def _sixteen_bit() -> np.ndarray:
    return rows(np.linspace(0, 65535, WIDTH).round().astype(np.uint16))


def _scaled(values: np.ndarray) -> np.ndarray:
    return grey(np.rint(values.astype(float) * 255 / 65535))


CASES: dict[str, Callable[[], tuple[Image.Image, str, str, np.ndarray]]] = {
    "1": lambda: (Image.fromarray(rows(RAMP) >= 128), "png", "1", grey((RAMP >= 128) * 255)),
    "L": lambda: (Image.fromarray(rows(RAMP)), "png", "L", grey(RAMP)),
    "LA": lambda: (
        Image.fromarray(np.dstack([rows(RAMP), rows(ALPHA)]), "LA"),
        "png",
        "LA",
        onto_white(grey(RAMP), rows(ALPHA)),
    ),
    "P": lambda: (_palette_image(INDICES), "png", "P", PALETTE[INDICES]),
    "PA": lambda: (_palette_alpha(), "tif", "PA", onto_white(PALETTE[INDICES], rows(ALPHA))),
    "RGB": lambda: (Image.fromarray(COLOURS), "png", "RGB", COLOURS),
    "RGBA": lambda: (
        Image.fromarray(np.dstack([COLOURS, rows(ALPHA)])),
        "png",
        "RGBA",
        onto_white(COLOURS, rows(ALPHA)),
    ),
    "CMYK": lambda: (Image.fromarray(CMYK, "CMYK"), "tif", "CMYK", _cmyk_expected()),
    "I;16 png": lambda: (Image.fromarray(_sixteen_bit()), "png", "I;16", _scaled(_sixteen_bit())),
    "I;16 tif": lambda: (Image.fromarray(_sixteen_bit()), "tif", "I;16", _scaled(_sixteen_bit())),
    "I;16B tif": lambda: (
        Image.fromarray(_sixteen_bit().astype(">u2")),
        "tif",
        "I;16B",
        _scaled(_sixteen_bit()),
    ),
    "I 8-bit values": lambda: (
        Image.fromarray(rows(RAMP).astype(np.int32)),
        "tif",
        "I",
        grey(RAMP),
    ),
    "I 16-bit values": lambda: (
        Image.fromarray(_sixteen_bit().astype(np.int32)),
        "tif",
        "I",
        _scaled(_sixteen_bit()),
    ),
    "F": lambda: (
        Image.fromarray(rows(RAMP).astype(np.float32) / 255),
        "tif",
        "F",
        grey(RAMP),
    ),
    "YCbCr": lambda: (
        Image.fromarray(np.dstack([rows(RAMP), rows(128), rows(128)]), "YCbCr"),
        "tif",
        "YCbCr",
        grey(RAMP),
    ),
}


def _palette_alpha() -> Image.Image:
    pixels = np.dstack([INDICES, rows(ALPHA)])
    image = Image.frombytes("PA", (WIDTH, 3), pixels.tobytes())
    image.putpalette(PALETTE.tobytes())
    return image


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_mode_loads_as_the_right_8_bit_rgb(tmp_path: Path, name: str) -> None:
    image, suffix, mode, expected = CASES[name]()
    assert_loads_as(tmp_path, image, f"image.{suffix}", mode, expected)


def test_a_mid_grey_16_bit_png_is_mid_grey_not_white(tmp_path: Path) -> None:
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((4, 4), 32768, np.uint16)).save(path)
    assert np.asarray(load_rgb(path)).max() == 128
    # 16-bit RGB, which PIL cannot write: written by hand.
    (tmp_path / "rgb16.png").write_bytes(png_bytes(4, 4, 16, 2, b"\x80\x00" * 48))
    assert set(np.asarray(load_rgb(tmp_path / "rgb16.png")).flat) == {128}


def test_palette_transparency_is_white(tmp_path: Path) -> None:
    image = _palette_image(INDICES)
    expected = PALETTE[INDICES].copy()
    expected[INDICES == 0] = 255
    path = tmp_path / "p.png"
    image.save(path, transparency=0)
    with Image.open(path) as reopened:
        assert reopened.mode == "P" and reopened.info["transparency"] == 0
    assert np.abs(np.asarray(load_rgb(path)).astype(int) - expected).max() <= 1


def test_an_rgb_transparency_key_is_white(tmp_path: Path) -> None:
    path = tmp_path / "key.png"
    Image.fromarray(COLOURS).save(path, transparency=tuple(int(v) for v in COLOURS[0, 0]))
    loaded = np.asarray(load_rgb(path))
    assert tuple(loaded[0, 0]) == (255, 255, 255)
    assert np.array_equal(loaded[:, 1:], COLOURS[:, 1:])


@pytest.mark.parametrize("mode", ["I;16L", "I;16N"])
def test_other_16_bit_layouts(mode: str) -> None:
    """PIL writes these to no file format as such (a TIFF comes back as I;16): in memory."""
    dtype = "<u2" if mode == "I;16L" else "=u2"
    image = Image.frombytes(mode, (WIDTH, 3), _sixteen_bit().astype(dtype).tobytes())
    assert image.mode == mode
    loaded = np.asarray(to_rgb(image, Path("x.png"))).astype(int)
    assert np.abs(loaded - _scaled(_sixteen_bit())).max() <= 1


def test_lab_and_hsv_are_converted(tmp_path: Path) -> None:
    # PIL keeps a* and b* as signed bytes, as TIFF stores them: white, black, sRGB red.
    lab = np.array([[(255, 0, 0), (0, 0, 0), (136, 80, 67)]], dtype=np.uint8)
    path = tmp_path / "lab.tif"
    Image.fromarray(lab, "LAB").save(path)
    with Image.open(path) as reopened:
        assert reopened.mode == "LAB"
    loaded = np.asarray(load_rgb(path)).astype(int)
    assert np.abs(loaded[0, :2] - [[255] * 3, [0] * 3]).max() <= 1
    assert loaded[0, 2, 0] > 240 and loaded[0, 2, 1:].max() < 20
    # HSV: no format stores it, so in memory. Hue 0 at full saturation is red.
    hsv = Image.fromarray(np.dstack([rows(0), rows(255), rows(RAMP)]), "HSV")
    loaded = np.asarray(to_rgb(hsv, Path("x.png"))).astype(int)
    assert np.abs(loaded - np.dstack([rows(RAMP), rows(0), rows(0)])).max() <= 1


def test_a_mode_pil_cannot_convert_is_refused() -> None:
    with pytest.raises(UserError, match="x.png has colour mode La, .* save it as 8-bit RGB"):
        to_rgb(Image.new("La", (2, 2)), Path("x.png"))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (np.array([[0, 70000]], np.int32), "32-bit integer pixels from 0 to 70000, outside"),
        (np.array([[-5, 10]], np.int32), "32-bit integer pixels from -5 to 10, outside"),
        (np.array([[0, 255]], np.float32), "float pixels from 0 to 255, not in 0..1"),
        (np.array([[-0.5, 0.5]], np.float32), "float pixels from -0.5 to 0.5, not in 0..1"),
        (np.array([[np.nan, 0.5]], np.float32), "float pixels that are NaN or infinite"),
    ],
)
def test_out_of_range_int_and_float_images_are_refused(
    tmp_path: Path, values: np.ndarray, message: str
) -> None:
    path = tmp_path / "odd.tif"
    Image.fromarray(values).save(path)
    with pytest.raises(UserError, match=f"image .*odd.tif has {message}.*convert the image to 8"):
        load_rgb(path)


def test_exif_orientation_is_still_applied_to_16_bit_images(tmp_path: Path) -> None:
    image = Image.fromarray(np.zeros((3, 8), np.uint16))  # 8 wide, 3 high
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image.save(tmp_path / "turned.png", exif=exif)
    assert load_rgb(tmp_path / "turned.png").size == (3, 8)


def test_an_unusable_float_image_is_refused_before_training(tmp_path: Path) -> None:
    from difftrain.data.folder import check_image_file

    path = tmp_path / "hdr.tif"
    Image.fromarray(np.array([[0.0, 4.0]], np.float32)).save(path)
    with pytest.raises(UserError, match="hdr.tif has float pixels from 0 to 4"):
        check_image_file(path)  # the up-front check, not the first training step


def test_a_16_bit_grey_transparency_key_is_white(tmp_path: Path) -> None:
    values = _sixteen_bit()
    key = int(values[0, 5])
    path = tmp_path / "key16.png"
    Image.fromarray(values).save(path, transparency=key)
    with Image.open(path) as reopened:  # PNG tRNS for 16-bit grey: the key in 0..65535
        assert reopened.mode == "I;16" and reopened.info["transparency"] == key
    expected = _scaled(values)
    expected[values == key] = 255
    loaded = np.asarray(load_rgb(path)).astype(int)
    assert (loaded[:, 5] == 255).all()
    assert np.abs(loaded - expected).max() <= 1
    # A grey a hair off the key is not transparent: only exact matches are.
    assert loaded[0, 4, 0] < 255 and loaded[0, 6, 0] < 255


def test_a_16_bit_transparency_key_survives_exif_rotation(tmp_path: Path) -> None:
    values = np.zeros((3, 8), np.uint16)
    values[0, 0] = 1000
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise
    Image.fromarray(values).save(tmp_path / "turned.png", exif=exif, transparency=1000)
    loaded = np.asarray(load_rgb(tmp_path / "turned.png"))
    assert loaded.shape == (8, 3, 3)
    assert (loaded == 255).all(axis=2).sum() == 1 and (loaded <= 255).all()


@pytest.mark.parametrize(
    ("values", "key"),
    [
        (np.array([[0, 100, 200, 100]], np.int32), 100),  # mode I, 8-bit values
        (np.array([[0, 30000, 65535, 30000]], np.int32), 30000),  # mode I, 16-bit values
        (np.array([[0.0, 0.25, 1.0, 0.25]], np.float32), 0.25),  # mode F
    ],
)
def test_i_and_f_transparency_keys_are_white(values: np.ndarray, key: float) -> None:
    """No format PIL writes keeps a key with these modes: in memory, as a decoder gives it."""
    image = Image.fromarray(values)
    opaque = np.asarray(to_rgb(image, Path("x.png")))[0, :, 0]
    assert opaque[1] < 255  # the key's grey, when nothing says it is transparent
    image.info["transparency"] = key
    loaded = np.asarray(to_rgb(image, Path("x.png")))[0, :, 0]
    assert list(loaded) == [opaque[0], 255, opaque[2], 255]
