"""Phone formats: HEIC/HEIF (pillow-heif) and AVIF (Pillow) photos add as the pixels of their JPEG source, and
the accepted formats are whatever the libraries read, as docs/store.md lists them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from photos import make_photo, make_scene
from PIL import Image

from stencil_cli.base import formats
from stencil_cli.base.images import PreparedImage, RejectedImage, prepare_image
from stencil_cli.base.sources import find_photos
from stencil_cli.store.db import open_store

ROOT = Path(__file__).resolve().parents[1]
LEVELS = 2  # "the same pixels": every channel of every pixel within 2 levels


def _jpeg_source(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A photo-like JPEG (gradients and soft shapes in muted colours) and its decoded pixels."""
    path = make_scene(tmp_path / "source.jpg", quality=95)
    with Image.open(path) as image:
        return path, np.asarray(image.convert("RGB"), dtype=np.int16)


def _stored_pixels(prepared: PreparedImage | RejectedImage) -> np.ndarray:
    assert isinstance(prepared, PreparedImage), prepared
    import io

    with Image.open(io.BytesIO(prepared.data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def _heic(source: np.ndarray, path: Path, **options: object) -> Path:
    """`source` as a lossless HEIC (RGB kept as RGB): the test is of stencil's decoding, not of the codec."""
    import pillow_heif

    pillow_heif.from_bytes(
        mode="RGB", size=(source.shape[1], source.shape[0]), data=source.astype(np.uint8).tobytes()
    ).save(path, quality=-1, chroma=444, matrix_coefficients=0, **options)
    return path


def test_heic_photo_is_stored_as_its_jpeg_sources_pixels(tmp_path: Path) -> None:
    _, source = _jpeg_source(tmp_path)
    prepared = prepare_image(_heic(source, tmp_path / "IMG_0001.HEIC"))
    stored = _stored_pixels(prepared)
    assert stored.shape == source.shape
    assert int(np.abs(stored - source).max()) <= LEVELS


def test_an_iphone_style_display_p3_heic_is_converted_to_srgb(tmp_path: Path) -> None:
    from iccprofiles import DISPLAY_P3, expected_srgb, matrix_profile

    patch = (200, 120, 60)
    source = np.zeros((300, 300, 3), dtype=np.int16) + np.array(patch, dtype=np.int16)
    path = _heic(source, tmp_path / "IMG_0002.HEIC", icc_profile=matrix_profile(DISPLAY_P3))
    stored = _stored_pixels(prepare_image(path))
    assert np.abs(stored[150, 150] - expected_srgb(patch, DISPLAY_P3)).max() <= LEVELS


def test_avif_photo_is_stored_as_its_jpeg_sources_pixels(tmp_path: Path) -> None:
    _, source = _jpeg_source(tmp_path)
    path = tmp_path / "photo.avif"
    Image.fromarray(source.astype(np.uint8)).save(path, quality=100, subsampling="4:4:4")
    stored = _stored_pixels(prepare_image(path))
    assert stored.shape == source.shape
    assert int(np.abs(stored - source).max()) <= LEVELS


def test_heic_and_avif_in_a_folder_are_added_with_the_rest(cli, tmp_path: Path) -> None:
    folder = tmp_path / "phone"
    _, source = _jpeg_source(tmp_path)
    folder.mkdir()
    _heic(source, folder / "a.heic")
    Image.fromarray(source[::-1].astype(np.uint8)).save(folder / "b.avif", quality=90)
    make_photo(folder / "c.jpg", seed=3)
    result = cli("add", "phone", folder, "--json")
    assert result.exit_code == 0, result.output
    assert sorted(row["original_name"] for row in json.loads(result.stdout)["added"]) == [
        "a.heic",
        "b.avif",
        "c.jpg",
    ]
    assert len(open_store().get_subject("phone").images) == 3


def test_accepted_suffixes_are_pillows_registry_with_heif() -> None:
    suffixes = formats.photo_suffixes()
    Image.init()
    registry = Image.registered_extensions()
    assert suffixes <= set(registry)
    assert {".heic", ".heif", ".avif", ".jpg", ".jpeg", ".png", ".webp", ".tif", ".tga", ".jp2"} <= suffixes
    assert ".pdf" not in suffixes  # Pillow writes PDF but cannot read it
    assert not {".mpg", ".mpeg", ".h5", ".grib", ".eps", ".wmf"} & suffixes  # identified, not decoded
    everything_decodable = {s for s, name in registry.items() if formats.is_photo_format(name)}
    assert suffixes == everything_decodable


def test_a_video_pillow_only_identifies_is_passed_over_in_a_folder(tmp_path: Path) -> None:
    make_photo(tmp_path / "a.jpg")
    (tmp_path / "clip.mpg").write_bytes(b"\x00\x00\x01\xb3" + b"\x00" * 200)  # an MPEG sequence header
    found = find_photos([tmp_path])
    assert [source.path.name for source in found.sources] == ["a.jpg"]
    assert found.other == 1 and found.rejected == []


def test_a_folder_takes_every_registered_format(tmp_path: Path) -> None:
    # a format no hand-written list had: the folder scan asks the registry, so it is found
    make_photo(tmp_path / "shot.jp2", size=(300, 300))
    make_photo(tmp_path / "shot.tga", size=(300, 300))
    found = find_photos([tmp_path])
    assert sorted(source.path.name for source in found.sources) == ["shot.jp2", "shot.tga"]


def test_store_docs_list_exactly_the_accepted_formats() -> None:
    text = (ROOT / "docs" / "store.md").read_text(encoding="utf-8")
    start, end = "<!-- formats: start -->\n", "<!-- formats: end -->"
    listed = text[text.index(start) + len(start) : text.index(end)]
    fix = "run `python -m stencil_cli.base.formats` and paste its list into docs/store.md"
    assert listed == formats.formats_markdown(), f"docs/store.md lists other formats than are accepted: {fix}"
    assert set(re.findall(r"`(\.[a-z0-9]+)`", listed)) == formats.photo_suffixes()


def test_add_help_says_what_is_accepted(cli) -> None:
    result = cli("add", "--help")
    text = " ".join(result.stdout.split())
    for word in ("HEIC", "AVIF", "JPEG", ".zip", "--recursive", "docs/store.md"):
        assert word in text, word


def test_heic_without_a_decoder_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, source = _jpeg_source(tmp_path)
    path = _heic(source, tmp_path / "phone.heic")
    from PIL import Image as PILImage

    monkeypatch.setattr(formats, "heif_available", lambda: False)
    monkeypatch.setattr("stencil_cli.base.images.heif_available", lambda: False)
    monkeypatch.setattr(PILImage, "OPEN", {k: v for k, v in PILImage.OPEN.items() if k != "HEIF"})
    monkeypatch.setattr(PILImage, "ID", [name for name in PILImage.ID if name != "HEIF"])
    result = prepare_image(path)
    assert isinstance(result, RejectedImage)
    assert "pip install pi-heif" in result.reason


def test_a_heif_decoder_without_gpl_parts_is_a_declared_dependency() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    dependencies = text[text.index("dependencies = [") : text.index("[project.optional-dependencies]")]
    assert re.search(r'^\s*"pi-heif>=', dependencies, re.MULTILINE)
    assert not re.search(r'^\s*"pillow-heif', dependencies, re.MULTILINE)  # its wheels are GPLv2 (x265)
