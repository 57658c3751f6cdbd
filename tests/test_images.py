"""Photo intake: every input mode becomes 8-bit RGB; bad files are rejected with a reason."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from photos import make_photo
from PIL import Image

from stencil_cli.base.images import (
    PreparedImage,
    RejectedImage,
    center_crop_resize,
    expand_paths,
    prepare_image,
)


def _decoded(prepared: PreparedImage) -> Image.Image:
    return Image.open(io.BytesIO(prepared.data))


@pytest.mark.parametrize(
    ("mode", "suffix"),
    [("RGB", ".png"), ("L", ".png"), ("P", ".png"), ("CMYK", ".jpg"), ("LA", ".png"), ("RGBA", ".png")],
)
def test_every_mode_becomes_rgb(tmp_path: Path, mode: str, suffix: str) -> None:
    path = make_photo(tmp_path / f"photo{suffix}", mode=mode)
    prepared = prepare_image(path)
    assert isinstance(prepared, PreparedImage)
    stored = _decoded(prepared)
    assert stored.mode == "RGB"
    assert stored.size == (320, 288)


def test_transparency_is_composited_on_white(tmp_path: Path) -> None:
    prepared = prepare_image(make_photo(tmp_path / "a.png", mode="RGBA"))
    assert isinstance(prepared, PreparedImage)
    stored = _decoded(prepared)
    assert stored.getpixel((300, 280)) == (255, 255, 255)  # transparent area -> white
    assert stored.getpixel((2, 2)) == (255, 0, 0)  # opaque area keeps its colour


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    image = Image.new("I;16", (300, 300), 40000)
    path = tmp_path / "deep.png"
    image.save(path)
    prepared = prepare_image(path)
    assert isinstance(prepared, PreparedImage)
    value = _decoded(prepared).getpixel((10, 10))
    assert value[0] == value[1] == value[2] == 40000 // 256


def test_animated_gif_takes_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (300, 300), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    prepared = prepare_image(path)
    assert isinstance(prepared, PreparedImage)
    red, green, blue = _decoded(prepared).getpixel((150, 150))
    assert red > 200 and blue < 50


def test_exif_rotated_jpeg_is_stored_upright(tmp_path: Path) -> None:
    # a landscape 400x300 pixel grid tagged "rotate 90° clockwise to display" (orientation 6)
    image = Image.new("RGB", (400, 300), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 100, 300))  # red band on the left edge as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    prepared = prepare_image(path)
    assert isinstance(prepared, PreparedImage)
    assert (prepared.width, prepared.height) == (300, 400)  # displayed upright: portrait
    stored = _decoded(prepared)
    assert "exif" not in stored.info or Image.open(io.BytesIO(prepared.data)).getexif().get(0x0112, 1) == 1
    red, _, blue = stored.getpixel((150, 20))  # the left band is now at the top
    assert red > 200 and blue < 60


def test_same_pixels_same_hash_and_jpeg_stays_jpeg(tmp_path: Path) -> None:
    first = prepare_image(make_photo(tmp_path / "a.jpg", seed=1))
    copy = tmp_path / "b.jpg"
    copy.write_bytes((tmp_path / "a.jpg").read_bytes())
    second = prepare_image(copy)
    other = prepare_image(make_photo(tmp_path / "c.jpg", seed=2))
    assert isinstance(first, PreparedImage) and isinstance(second, PreparedImage)
    assert isinstance(other, PreparedImage)
    assert first.sha256 == second.sha256 != other.sha256
    assert first.suffix == ".jpg"


def test_small_truncated_and_fake_files_are_rejected(tmp_path: Path) -> None:
    small = make_photo(tmp_path / "small.png", size=(255, 600))
    good = make_photo(tmp_path / "good.jpg", size=(600, 600))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:2000])
    fake = tmp_path / "notes.jpg"
    fake.write_text("not a photo")
    for path, reason in ((small, "too small"), (truncated, "cannot be read"), (fake, "not an image")):
        result = prepare_image(path)
        assert isinstance(result, RejectedImage), path
        assert reason in result.reason


def test_low_resolution_warns(tmp_path: Path) -> None:
    prepared = prepare_image(make_photo(tmp_path / "a.png", size=(300, 400)))
    assert isinstance(prepared, PreparedImage)
    assert len(prepared.warnings) == 1 and "512" in prepared.warnings[0]
    assert prepare_image(make_photo(tmp_path / "b.png", size=(512, 600))).warnings == ()  # type: ignore[union-attr]


def test_decompression_bomb_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("stencil_cli.base.images.MAX_PIXELS", 100_000)
    result = prepare_image(make_photo(tmp_path / "big.png", size=(800, 800)))
    assert isinstance(result, RejectedImage)
    assert "too large" in result.reason


def test_expand_paths_reads_folders_and_reports_missing(tmp_path: Path) -> None:
    make_photo(tmp_path / "dir" / "b.png")
    make_photo(tmp_path / "dir" / "a.jpg")
    (tmp_path / "dir" / "readme.txt").write_text("hi")
    files, missing = expand_paths([tmp_path / "dir", tmp_path / "nope.jpg"])
    assert [f.path.name for f in files] == ["a.jpg", "b.png"]
    assert [m.source.name for m in missing] == ["nope.jpg"]


def test_center_crop_resize_makes_a_square() -> None:
    image = Image.new("RGB", (800, 600))
    assert center_crop_resize(image, 512).size == (512, 512)


def _jpeg_with_damaged_exif(path: Path) -> Path:
    """A JPEG whose EXIF says "rotate 90°" (orientation 6) but whose description tag points past the end."""
    import io
    import struct

    entries = struct.pack(">HHII", 0x0112, 3, 1, 6 << 16) + struct.pack(">HHII", 0x010E, 2, 1000, 38)
    exif = b"MM\x00\x2a\x00\x00\x00\x08" + struct.pack(">H", 2) + entries + struct.pack(">I", 0) + b"abc"
    buffer = io.BytesIO()
    Image.new("RGB", (640, 600), (10, 100, 200)).save(buffer, "JPEG", exif=b"Exif\x00\x00" + exif)
    path.write_bytes(buffer.getvalue())
    return path


def test_damaged_exif_is_one_warning_line_not_pillows_warnings(cli, tmp_path: Path) -> None:
    import warnings

    (tmp_path / "photos").mkdir()
    photo = _jpeg_with_damaged_exif(tmp_path / "photos" / "odd.jpg")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning Pillow lets through fails the test
        prepared = prepare_image(photo)
    assert isinstance(prepared, PreparedImage)
    assert (prepared.width, prepared.height) == (600, 640)  # the readable orientation is still applied
    assert any("odd.jpg: its EXIF data is damaged" in warning for warning in prepared.warnings)
    result = cli("add", "robot", tmp_path / "photos")
    assert result.exit_code == 0, result.output
    assert "UserWarning" not in result.stderr and "site-packages" not in result.stderr
    assert "its EXIF data is damaged" in " ".join(result.stderr.split())
