"""Colour that stays true: an ICC-tagged photo (Display P3, Adobe RGB) is converted to sRGB on intake, and a
damaged profile warns and reads as sRGB instead of blocking the add."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from iccprofiles import ADOBE_RGB, DISPLAY_P3, RGBSpace, expected_srgb, matrix_profile
from PIL import Image, ImageCms

from stencil_cli.base.images import PreparedImage, load_rgb, prepare_image

PATCH = (200, 120, 60)  # a warm orange, inside the sRGB gamut in both spaces
LEVELS = 2


def _tagged_photo(path: Path, profile: bytes | None, fmt: str, mode: str = "RGB") -> Path:
    """A 300x300 photo: a flat PATCH on the left half, a grey ramp on the right, tagged with `profile`."""
    image = Image.new("RGB", (300, 300), PATCH)
    ramp = np.tile(np.linspace(0, 255, 150).astype(np.uint8)[None, :, None], (300, 1, 3))
    image.paste(Image.fromarray(ramp), (150, 0))
    if mode != "RGB":
        image = image.convert(mode)
    extra = {"quality": 100, "subsampling": 0} if fmt == "JPEG" else {}
    image.save(path, format=fmt, icc_profile=profile, **extra)
    return path


def _stored(prepared: PreparedImage | object) -> Image.Image:
    assert isinstance(prepared, PreparedImage), prepared
    return Image.open(io.BytesIO(prepared.data))


def _patch(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64)[100:200, 20:120].reshape(-1, 3).mean(axis=0)


@pytest.mark.parametrize("space", [DISPLAY_P3, ADOBE_RGB], ids=lambda space: space.name)
@pytest.mark.parametrize(("fmt", "suffix"), [("JPEG", ".jpg"), ("PNG", ".png")])
def test_a_tagged_photo_is_converted_to_srgb(tmp_path: Path, space: RGBSpace, fmt: str, suffix: str) -> None:
    path = _tagged_photo(tmp_path / f"tagged{suffix}", matrix_profile(space), fmt)
    expected = expected_srgb(PATCH, space)
    assert np.abs(expected - np.array(PATCH)).max() > 5  # read as sRGB, the colour would be off
    stored = _stored(prepare_image(path))
    assert np.abs(_patch(stored) - expected).max() <= LEVELS
    assert "icc_profile" not in stored.info  # the stored copy is plain sRGB, with no profile to misapply


def test_training_reads_the_stored_colours_as_stored(tmp_path: Path) -> None:
    path = _tagged_photo(tmp_path / "p3.png", matrix_profile(DISPLAY_P3), "PNG")
    prepared = prepare_image(path)
    assert isinstance(prepared, PreparedImage)
    stored = tmp_path / f"stored{prepared.suffix}"
    stored.write_bytes(prepared.data)
    again = load_rgb(stored)
    assert np.abs(_patch(again) - expected_srgb(PATCH, DISPLAY_P3)).max() <= LEVELS


def test_an_srgb_tagged_photo_keeps_its_numbers(tmp_path: Path) -> None:
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    stored = _stored(prepare_image(_tagged_photo(tmp_path / "s.png", srgb, "PNG")))
    assert np.abs(_patch(stored) - np.array(PATCH)).max() <= 1


@pytest.mark.parametrize(
    ("profile", "mode"),
    [
        (b"this is not an ICC profile", "RGB"),
        (matrix_profile(DISPLAY_P3)[:200], "RGB"),  # cut short
        (matrix_profile(DISPLAY_P3), "L"),  # an RGB profile on greyscale pixels
    ],
    ids=["garbage", "truncated", "wrong-colour-space"],
)
def test_a_broken_profile_warns_and_reads_as_srgb(tmp_path: Path, profile: bytes, mode: str) -> None:
    path = _tagged_photo(tmp_path / "broken.png", profile, "PNG", mode=mode)
    prepared = prepare_image(path)
    assert isinstance(prepared, PreparedImage), prepared
    assert any("broken.png" in note and "colour profile" in note for note in prepared.warnings)
    numbers = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)[100:200, 20:120]
    assert np.abs(_patch(_stored(prepared)) - numbers.reshape(-1, 3).mean(axis=0)).max() <= 0.5


def test_a_broken_profile_does_not_block_the_add(cli, tmp_path: Path) -> None:
    path = _tagged_photo(tmp_path / "broken.jpg", b"garbage profile bytes", "JPEG")
    result = cli("add", "tagged", path)
    assert result.exit_code == 0, result.output
    assert "added 1 photo(s)" in result.stdout
    assert "colour profile" in result.stderr and "read as sRGB" in result.stderr


def test_a_transparent_tagged_photo_is_converted_and_composited(tmp_path: Path) -> None:
    image = Image.new("RGBA", (300, 300), (*PATCH, 255))
    image.paste((0, 0, 0, 0), (150, 0, 300, 300))  # the right half transparent
    path = tmp_path / "clear.png"
    image.save(path, icc_profile=matrix_profile(ADOBE_RGB))
    stored = _stored(prepare_image(path))
    assert np.abs(_patch(stored) - expected_srgb(PATCH, ADOBE_RGB)).max() <= LEVELS
    assert stored.getpixel((250, 150)) == (255, 255, 255)
