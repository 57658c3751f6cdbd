"""Folders as they come: sub-folders only with --recursive, hidden files (macOS `._*`, `.DS_Store`) passed
over with a count, and `.zip` files of photos read safely in memory."""

from __future__ import annotations

import json
import stat
import zipfile
from pathlib import Path

import pytest
from photos import make_photo

from stencil_cli.base import sources
from stencil_cli.base.sources import find_photos
from stencil_cli.store.db import open_store


def _store_files(home: Path) -> list[Path]:
    return (
        sorted(p for p in (home / "subjects").rglob("*") if p.is_file())
        if (home / "subjects").exists()
        else []
    )


def _nested(root: Path) -> Path:
    """nested/{a,b}.jpg and nested/2024/trip/{c,d,e}.jpg (an album as a photo app exports it)."""
    make_photo(root / "a.jpg", seed=1)
    make_photo(root / "b.jpg", seed=2)
    for seed in (3, 4, 5):
        make_photo(root / "2024" / "trip" / f"{'cde'[seed - 3]}.jpg", seed=seed)
    return root


def _apple_double(path: Path) -> Path:
    """A macOS AppleDouble resource file: a binary header, not an image, named like the photo beside it."""
    path.write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + b"\x00" * 60)
    return path


# -- sub-folders ------------------------------------------------------------------------------------------


def test_subfolders_are_refused_with_one_line_naming_recursive(
    cli, tmp_path: Path, stencil_home: Path
) -> None:
    folder = _nested(tmp_path / "nested")
    result = cli("add", "nest", folder)
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert str(folder) in lines[0] and "--recursive" in lines[0] and "2024/trip" in lines[0]
    assert "3 photo(s)" in lines[0]
    assert open_store().subject_names() == []
    assert _store_files(stencil_home) == []


def test_recursive_adds_the_photos_of_every_subfolder(cli, tmp_path: Path) -> None:
    folder = _nested(tmp_path / "nested")
    result = cli("add", "nest", folder, "--recursive", "--json")
    assert result.exit_code == 0, result.output
    names = sorted(row["original_name"] for row in json.loads(result.stdout)["added"])
    assert names == ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"]


def test_skip_bad_adds_the_top_folder_and_warns_about_subfolders(cli, tmp_path: Path) -> None:
    result = cli("add", "nest", _nested(tmp_path / "nested"), "--skip-bad")
    assert result.exit_code == 0, result.output
    assert "added 2 photo(s)" in result.stdout
    assert "--recursive" in result.stderr


def test_a_subfolder_without_photos_is_no_reason_to_refuse(cli, tmp_path: Path) -> None:
    folder = tmp_path / "album"
    make_photo(folder / "a.jpg")
    (folder / "notes").mkdir()
    (folder / "notes" / "readme.txt").write_text("hi")
    assert cli("add", "album", folder).exit_code == 0


def test_a_linked_folder_loop_does_not_hang_recursion(tmp_path: Path) -> None:
    folder = tmp_path / "loop"
    make_photo(folder / "a.jpg")
    (folder / "again").symlink_to(folder, target_is_directory=True)
    found = find_photos([folder], recursive=True)
    assert [source.path.name for source in found.sources] == ["a.jpg"]


# -- hidden files -----------------------------------------------------------------------------------------


def test_apple_double_and_hidden_files_are_passed_over_with_a_count(cli, tmp_path: Path) -> None:
    folder = tmp_path / "from-a-mac"
    make_photo(folder / "01.jpg", seed=1)
    make_photo(folder / "02.jpg", seed=2)
    _apple_double(folder / "._01.jpg")
    _apple_double(folder / "._02.jpg")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    make_photo(folder / ".hidden.jpg", seed=9)  # a dot file is hidden even when it is a photo
    (folder / "clip.mov").write_bytes(b"\x00" * 64)
    result = cli("add", "mac", folder)
    assert result.exit_code == 0, result.output
    assert "added 2 photo(s)" in result.stdout
    assert "passed over 4 hidden file(s) and 1 non-photo file(s)" in result.stdout
    data = json.loads(cli("add", "mac", folder, "--json").stdout)
    assert data["passed_over"] == {"hidden": 4, "other": 1}


def test_an_apple_double_file_named_on_the_command_line_is_passed_over(cli, tmp_path: Path) -> None:
    photo = make_photo(tmp_path / "01.jpg")
    twin = _apple_double(tmp_path / "._01.jpg")  # as `find . -name '*.jpg' | xargs stencil add` gives it
    result = cli("add", "mac", photo, twin)
    assert result.exit_code == 0, result.output
    assert "added 1 photo(s)" in result.stdout and "passed over 1 hidden file(s)" in result.stdout


def test_a_folder_of_only_hidden_files_says_what_it_passed_over(cli, tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    _apple_double(folder / "._01.jpg")
    result = cli("add", "x", folder)
    assert result.exit_code == 2
    assert "no photos found" in result.stderr and "1 hidden" in result.stderr


# -- zips -------------------------------------------------------------------------------------------------


def _zip_of_photos(path: Path, tmp_path: Path) -> Path:
    """A zip as macOS's "Compress" makes it: photos in a folder, AppleDouble twins under __MACOSX."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for seed in (1, 2):
            photo = make_photo(tmp_path / "zsrc" / f"{seed}.jpg", seed=seed + 20)
            archive.write(photo, f"holiday/{seed}.jpg")
            archive.writestr(f"__MACOSX/holiday/._{seed}.jpg", b"\x00\x05\x16\x07 AppleDouble")
        archive.write(make_photo(tmp_path / "zsrc" / "3.png", seed=23), "holiday/more/3.png")
        archive.writestr("holiday/readme.txt", "photos from the trip")
    return path


def test_a_zip_of_photos_is_added_without_unpacking_to_disk(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = _zip_of_photos(tmp_path / "holiday.zip", tmp_path)

    def no_extracting(*args: object, **kwargs: object) -> None:
        raise AssertionError("a zip member was extracted to disk")

    monkeypatch.setattr(zipfile.ZipFile, "extract", no_extracting)
    monkeypatch.setattr(zipfile.ZipFile, "extractall", no_extracting)
    before = set(tmp_path.rglob("*"))
    result = cli("add", "trip", archive, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert sorted(row["original_name"] for row in data["added"]) == ["1.jpg", "2.jpg", "3.png"]
    assert data["passed_over"] == {"hidden": 2, "other": 1}
    created = {p for p in set(tmp_path.rglob("*")) - before if "stencil-home" not in p.parts}
    assert created == set()


def _zip_with(path: Path, name: str, data: bytes, **info: object) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        member = zipfile.ZipInfo(name)
        member.compress_type = zipfile.ZIP_DEFLATED
        for key, value in info.items():
            setattr(member, key, value)
        archive.writestr(member, data)
    return path


def test_zip_members_with_unsafe_paths_are_refused_and_nothing_is_written(
    cli, tmp_path: Path, stencil_home: Path
) -> None:
    photo = make_photo(tmp_path / "p.jpg").read_bytes()
    for name in ("../../escape.jpg", "/etc/passwd.jpg", "C:/windows.jpg"):
        archive = _zip_with(tmp_path / "evil.zip", name, photo)
        result = cli("add", "evil", archive)
        assert result.exit_code == 2, name
        assert "unsafe path" in result.stderr and "evil.zip" in result.stderr
    assert not (tmp_path.parent / "escape.jpg").exists()
    assert open_store().subject_names() == []
    assert _store_files(stencil_home) == []


def test_a_zip_bomb_member_is_refused_unread(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 64 MiB of zeros packs into ~64 KiB: a ratio no photo has
    archive = _zip_with(tmp_path / "bomb.zip", "big.png", bytes(64 * 2**20))
    reads: list[str] = []
    monkeypatch.setattr(sources, "_member_reader", lambda path, name: reads.append(name) or (lambda: b""))
    result = cli("add", "bomb", archive)
    assert result.exit_code == 2
    assert "zip bomb" in result.stderr and "big.png" in result.stderr
    assert reads == []


def test_oversized_and_crowded_zips_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    photo = make_photo(tmp_path / "p.jpg").read_bytes()
    archive = tmp_path / "many.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for index in range(5):
            handle.writestr(f"{index}.jpg", photo)
    monkeypatch.setattr(sources, "MAX_ZIP_MEMBERS", 4)
    crowded = find_photos([archive])
    assert crowded.sources == [] and "at most 4" in crowded.rejected[0].reason
    monkeypatch.setattr(sources, "MAX_ZIP_MEMBERS", 100)
    monkeypatch.setattr(sources, "MAX_ZIP_BYTES", len(photo) * 4)
    big = find_photos([archive])
    assert big.sources == [] and "split it" in big.rejected[0].reason
    monkeypatch.setattr(sources, "MAX_ZIP_BYTES", 2**40)
    monkeypatch.setattr(sources, "MAX_MEMBER_BYTES", len(photo) - 1)
    per_photo = find_photos([archive])
    assert per_photo.sources == [] and len(per_photo.rejected) == 5


def test_links_and_encrypted_members_are_refused(tmp_path: Path) -> None:
    link = _zip_with(
        tmp_path / "link.zip", "a.jpg", b"/etc/passwd", external_attr=(stat.S_IFLNK | 0o777) << 16
    )
    assert "link" in find_photos([link]).rejected[0].reason
    locked = _zip_with(tmp_path / "locked.zip", "a.jpg", b"x" * 100)
    data = bytearray(locked.read_bytes())  # zipfile cannot write encrypted members: set the flag by hand
    for signature, flags_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        data[data.index(signature) + flags_at] |= 0x1
    locked.write_bytes(bytes(data))
    assert "encrypted" in find_photos([locked]).rejected[0].reason


def test_a_damaged_zip_is_one_refusal_naming_it(cli, tmp_path: Path) -> None:
    archive = tmp_path / "cut.zip"
    archive.write_bytes(_zip_of_photos(tmp_path / "whole.zip", tmp_path).read_bytes()[:500])
    result = cli("add", "cut", archive)
    assert result.exit_code == 2
    assert "cut.zip" in result.stderr and "zip" in result.stderr.split("cut.zip", 1)[1]


def test_skip_bad_adds_the_good_members_of_a_zip(cli, tmp_path: Path) -> None:
    archive = tmp_path / "mixed.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.write(make_photo(tmp_path / "ok.jpg", seed=7), "ok.jpg")
        handle.writestr("broken.jpg", b"not a photo")
    refused = cli("add", "mixed", archive)
    assert refused.exit_code == 2 and "mixed.zip/broken.jpg" in refused.stderr
    result = cli("add", "mixed", archive, "--skip-bad", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [row["original_name"] for row in data["added"]] == ["ok.jpg"]
    assert data["skipped"][0]["file"].endswith("mixed.zip/broken.jpg")


def test_a_zip_inside_a_folder_is_read_too(tmp_path: Path) -> None:
    folder = tmp_path / "download"
    folder.mkdir()
    _zip_of_photos(folder / "holiday.zip", tmp_path)
    make_photo(folder / "cover.jpg", seed=30)
    found = find_photos([folder])
    assert sorted(source.path.name for source in found.sources) == ["1.jpg", "2.jpg", "3.png", "cover.jpg"]


def test_a_single_refusal_is_one_line_naming_the_file_and_the_fix(cli, tmp_path: Path) -> None:
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a photo")
    result = cli("add", "one", bad)
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "notes.jpg" in lines[0] and "convert it to JPEG or PNG" in lines[0] and "--skip-bad" in lines[0]
