"""The store under damage: corrupt databases, read-only stores, full disks, symlinks, lost rows and files."""

from __future__ import annotations

import errno
import os
import resource
import shutil
import sqlite3
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from photos import make_photo
from storecheck import check_store

from stencil_cli.base import fsutil
from stencil_cli.base.errors import (
    BadInputError,
    CorruptStoreError,
    DiskFullError,
    NotFoundError,
    StencilError,
    StoreReadOnlyError,
)
from stencil_cli.base.images import prepare_image
from stencil_cli.store.db import open_store
from stencil_cli.store.records import validate_name
from stencil_cli.store.subjects import SubjectChangedError


def _add(store, name: str, folder: Path, count: int = 2, start: int = 0):
    photos = [make_photo(folder / f"p{i}.jpg", seed=i) for i in range(start, start + count)]
    return store.add_images(name, [prepare_image(p) for p in photos])


@pytest.fixture
def filled(stencil_home: Path, tmp_path: Path) -> Path:
    """A store with subjects 'cat' (2 photos) and 'dog' (1 photo), closed again."""
    store = open_store()
    _add(store, "cat", tmp_path / "cat")
    _add(store, "dog", tmp_path / "dog", count=1, start=5)
    store.close()
    assert check_store(stencil_home) == []
    return stencil_home


# -- names --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ab\n", "ab\r\n", "\nab", "a b"])
def test_a_name_with_a_newline_or_space_is_refused(name: str) -> None:
    with pytest.raises(BadInputError, match="invalid subject name"):
        validate_name(name)
    assert validate_name("ab") == "ab"


# -- damaged database ---------------------------------------------------------------------------------


def _damage(db: Path, how: str) -> None:
    data = db.read_bytes()
    if how == "random":
        db.write_bytes(os.urandom(len(data)))
    elif how == "truncated":
        db.write_bytes(data[: len(data) // 3])
    elif how == "garbled":  # header intact, every page after the first overwritten
        db.write_bytes(data[:4096] + b"\xa5" * (len(data) - 4096))


@pytest.mark.parametrize("how", ["random", "truncated", "garbled"])
def test_a_damaged_database_names_the_file_and_the_way_out(filled: Path, how: str, cli) -> None:
    db = filled / "stencil.db"
    _damage(db, how)
    with pytest.raises(CorruptStoreError) as caught:
        store = open_store()
        store.list_subjects()
        store.get_subject("cat")
    message = str(caught.value)
    assert str(db) in message and "damaged" in message
    assert "move it aside" in message and "stencil store repair" in message
    result = cli("ls")
    assert result.exit_code == 1
    assert "unexpected" not in result.output and "damaged" in result.output


def test_a_damaged_database_moved_aside_is_rebuilt_from_the_folders(filled: Path) -> None:
    db = filled / "stencil.db"
    _damage(db, "random")
    db.rename(filled / "stencil.db.broken")
    store = open_store()
    assert store.subject_names() == []
    assert store.unindexed_folders() == ["cat", "dog"]
    report = store.repair()
    assert report["subjects"] == ["cat", "dog"] and report["images"] == 3
    assert [len(store.get_subject(n).images) for n in ("cat", "dog")] == [2, 1]
    assert store.unindexed_folders() == []
    assert store.repair()["images"] == 0  # idempotent
    store.close()
    assert check_store(filled) == []


def test_repair_keeps_unindexed_runs_out_of_cleans_reach(filled: Path) -> None:
    (filled / "stencil.db").unlink()
    run = filled / "subjects" / "cat" / "runs" / "3"
    run.mkdir(parents=True)
    (run / "weights.safetensors").write_bytes(b"w")
    store = open_store()
    store.repair()
    store.clean(min_age_s=0)
    assert (filled / "subjects" / "cat" / "recovered" / "runs" / "3" / "weights.safetensors").exists()


def test_integrity_problems_are_reported(filled: Path) -> None:
    store = open_store()
    assert store.integrity_problems() == []
    store.close()
    _damage(filled / "stencil.db", "garbled")
    conn = sqlite3.connect(filled / "stencil.db")
    with pytest.raises(sqlite3.DatabaseError):
        conn.execute("select * from images").fetchall()
    assert check_store(filled) != []


# -- read-only store ----------------------------------------------------------------------------------


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_a_read_only_store_reads_and_refuses_changes_saying_read_only(filled: Path, tmp_path: Path) -> None:
    before = _snapshot(filled)
    store = open_store(read_only=True)
    assert store.read_only
    assert [row["name"] for row in store.list_subjects()] == ["cat", "dog"]
    assert len(store.get_subject("cat").images) == 2
    assert store.missing_files() == []
    for change in (
        lambda: _add(store, "cat", tmp_path / "more", start=7),
        lambda: store.remove_subject("dog"),
        lambda: store.set_config("k", "v"),
        lambda: store.clean(min_age_s=0),
    ):
        with pytest.raises(StoreReadOnlyError) as caught:
            change()
        assert "read-only" in str(caught.value) and "locked" not in str(caught.value)
    store.close()
    assert _snapshot(filled) == before  # not a byte written: no migration, no -wal / -shm files


def test_an_unwritable_store_opens_read_only_by_itself(filled: Path, monkeypatch, cli) -> None:
    monkeypatch.setattr("stencil_cli.store.connection._writable", lambda root, db: False)
    assert open_store().read_only
    listed = cli("ls")
    assert listed.exit_code == 0 and "cat" in listed.stdout
    removed = cli("rm", "dog", "--yes")
    assert removed.exit_code == 1 and "read-only" in removed.output
    assert "locked" not in removed.output and "unexpected" not in removed.output


def _chattr(flag: str, *paths: Path) -> bool:
    if shutil.which("chattr") is None:
        return False
    return subprocess.run(["chattr", flag, *map(str, paths)], capture_output=True).returncode == 0


def test_a_store_the_system_will_not_let_anyone_write_still_lists(filled: Path, cli) -> None:
    """Immutable files stop even root, unlike chmod: the closest a test gets to a read-only mount."""
    db = filled / "stencil.db"
    if os.geteuid() != 0:
        os.chmod(db, 0o444)
        os.chmod(filled, 0o555)
    elif not _chattr("+i", db, filled):
        pytest.skip("cannot make files immutable here")
    try:
        assert open_store().read_only
        listed = cli("ls")
        assert listed.exit_code == 0 and "cat" in listed.stdout, listed.output
        shown = cli("show", "cat")
        assert shown.exit_code == 0, shown.output
        removed = cli("rm", "dog", "--yes")
        assert removed.exit_code == 1 and "read-only" in removed.output, removed.output
    finally:
        if os.geteuid() == 0:
            _chattr("-i", db, filled)
        else:
            os.chmod(filled, 0o755)
            os.chmod(db, 0o644)


# -- full disk / file-size limit ----------------------------------------------------------------------


class _FileSizeLimit:
    """Lower this process's file-size limit (``ulimit -f``) for a block; Python ignores SIGXFSZ."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def __enter__(self) -> None:
        self.saved = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, self.saved[1]))

    def __exit__(self, *exc: object) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, self.saved)


def test_a_file_over_the_size_limit_is_disk_full_and_the_old_file_stays(tmp_path: Path) -> None:
    target = tmp_path / "weights.safetensors"
    target.write_bytes(b"old")
    with _FileSizeLimit(64 * 1024), pytest.raises(DiskFullError) as caught:
        fsutil.atomic_write_bytes(target, b"x" * (1024 * 1024))
    assert str(caught.value).startswith(f"disk full at {target}")
    assert caught.value.path == target
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.safetensors"]  # no temp file left


def test_disk_full_errors_are_recognised() -> None:
    import errno

    for number in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        with pytest.raises(DiskFullError, match="disk full at /x"), fsutil.disk_full_as_error("/x"):
            raise OSError(number, os.strerror(number))
    with pytest.raises(PermissionError), fsutil.disk_full_as_error("/x"):
        raise PermissionError(errno.EACCES, "denied")


def test_a_database_that_cannot_grow_says_disk_full_not_locked(filled: Path) -> None:
    store = open_store()
    size = (filled / "stencil.db").stat().st_size + (filled / "stencil.db-wal").stat().st_size
    with _FileSizeLimit(size + 64 * 1024), pytest.raises(DiskFullError) as caught:
        for index in range(20):
            store.set_config(f"big{index}", "x" * 200_000)
    assert "disk full at" in str(caught.value) and "locked" not in str(caught.value)
    assert store.get_config("big0") is None or len(store.get_config("big0")) == 200_000
    store.close()
    assert check_store(filled) == []


# -- file modes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_written_files_and_built_folders_honour_the_umask(tmp_path: Path, umask: int) -> None:
    saved = os.umask(umask)
    try:
        fsutil.atomic_write_bytes(tmp_path / "a.bin", b"1")
        built = fsutil.build_folder_once(tmp_path / "model", "v1", lambda d: (d / "f").write_bytes(b"2"))
    finally:
        os.umask(saved)
    assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(built.stat().st_mode) == 0o777 & ~umask


def test_stored_photos_are_readable_by_the_group_under_the_usual_umask(stencil_home: Path, tmp_path) -> None:
    saved = os.umask(0o022)
    try:
        added = _add(open_store(), "cat", tmp_path / "p", count=1)
    finally:
        os.umask(saved)
    assert stat.S_IMODE(Path(added.added[0]["file"]).stat().st_mode) == 0o644


# -- symlinks -----------------------------------------------------------------------------------------


def test_a_subject_folder_that_is_a_symlink_is_refused_before_anything_is_deleted(
    filled: Path, tmp_path: Path
) -> None:
    folder = filled / "subjects" / "dog"
    elsewhere = tmp_path / "elsewhere-dog"
    shutil.move(folder, elsewhere)
    folder.symlink_to(elsewhere, target_is_directory=True)
    store = open_store()
    for action in (lambda: store.generation_dir("dog"), lambda: store.remove_subject("dog")):
        with pytest.raises(StencilError, match="symbolic link"):
            action()
    assert store.subject_names() == ["cat", "dog"]  # rm refused before deleting rows
    assert elsewhere.is_dir() and any(elsewhere.rglob("*.jpg"))


def test_clean_removes_dangling_links_and_never_follows_links(filled: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"precious")
    images = filled / "subjects" / "cat" / "images"
    (images / "dangling.jpg").symlink_to(tmp_path / "nothing-here.jpg")
    (images / "pointer.png").symlink_to(outside)
    generations = filled / "subjects" / "cat" / "generations" / "1"
    generations.mkdir(parents=True)
    (generations / "gone.png").symlink_to(tmp_path / "gone.png")
    removed = open_store().clean(min_age_s=0)
    assert {p.name for p in removed} == {"dangling.jpg", "pointer.png", "gone.png"}
    assert outside.read_bytes() == b"precious"
    assert check_store(filled) == []


# -- clean never deletes what it cannot account for --------------------------------------------------------


@pytest.mark.parametrize("loss", ["deleted", "emptied"])
def test_clean_after_a_lost_database_keeps_every_subject_folder(filled: Path, loss: str, cli) -> None:
    before = _snapshot(filled / "subjects")
    db = filled / "stencil.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    if loss == "emptied":
        db.write_bytes(b"")
    store = open_store()
    assert store.subject_names() == [] and store.unindexed_folders() == ["cat", "dog"]
    assert store.clean(min_age_s=0) == []
    assert cli("store", "clean", "--older-than", "0").exit_code == 0
    assert _snapshot(filled / "subjects") == before
    with pytest.raises(NotFoundError):
        store.clean(min_age_s=0, remove_unindexed={"nope"})
    _add(store, "fox", filled.parent / "fox", count=1, start=9)
    with pytest.raises(BadInputError, match="stencil rm fox"):
        store.clean(min_age_s=0, remove_unindexed={"fox"})  # it has a row: not for clean to remove
    removed = store.clean(min_age_s=0, remove_unindexed={"dog"})
    assert removed == [filled / "subjects" / "dog"] and (filled / "subjects" / "cat").is_dir()


# -- missing files ------------------------------------------------------------------------------------


def test_a_photo_deleted_by_hand_is_reported_and_adding_it_again_restores_it(filled: Path, tmp_path) -> None:
    store = open_store()
    photo = store.get_subject("cat").images[0]
    Path(photo["file"]).unlink()
    assert [(m["id"], m["subject"]) for m in store.missing_files("cat")] == [(photo["id"], "cat")]
    assert [m["id"] for m in store.missing_files()] == [photo["id"]]
    assert store.missing_files("dog") == []
    relative = store.relative(Path(photo["file"]))
    assert check_store(filled) == [f"image {photo['id']}: file missing: {relative}"]
    again = _add(store, "cat", tmp_path / "cat")  # the same photos as the fixture's
    assert again.added == [] and [row["id"] for row in again.restored] == [photo["id"]]
    assert store.missing_files() == []
    store.close()
    assert check_store(filled) == []


# -- a long command keeps to the subject it started with ------------------------------------------------


def test_rows_for_a_subject_removed_and_re_added_meanwhile_are_refused(filled: Path, tmp_path) -> None:
    store = open_store()
    pinned_subject = store.get_subject("dog")
    pinned = pinned_subject.id
    run = store.create_run("dog", {"steps": 1}, "tiny", subject_id=pinned)
    store.finish_run(run.id, "done")
    store.remove_subject("dog")  # what `rm dog` in another process does
    with pytest.raises(SubjectChangedError, match="was removed"):
        store.add_generation(pinned_subject, {"prompt": "p", "run_id": run.id})
    _add(store, "dog", tmp_path / "dog2", count=1, start=11)  # and a new 'dog' appears
    for write in (
        lambda: store.add_generation(pinned_subject, {"prompt": "p", "run_id": run.id}),
        lambda: store.create_run("dog", {}, "tiny", subject_id=pinned),
    ):
        with pytest.raises(SubjectChangedError, match="removed and added again"):
            write()
    with pytest.raises(SubjectChangedError, match="no longer exists"):
        store.update_run(run.id, step=5)
    assert list(store.db.query("select * from generations")) == []
    assert store.list_runs("dog") == []
    fresh = store.get_subject("dog")
    made = store.create_run("dog", {}, "tiny", subject_id=fresh.id)
    store.finish_run(made.id, "failed")
    assert store.add_generation(fresh, {"prompt": "p"}).subject_id == fresh.id


# -- every method explains the database errors it meets --------------------------------------------------


class _BrokenDatabase:
    """A database handle whose every query fails the way a damaged file does (transactions still work)."""

    def __init__(self, real: Any) -> None:
        self.conn = real.conn
        self.atomic = real.atomic

    def _fail(self, *args: Any, **kwargs: Any) -> Any:
        raise sqlite3.DatabaseError("database disk image is malformed")

    query = execute = __getitem__ = close = _fail


PATH_HELPERS = {"subject_dir", "absolute", "relative", "run_dir", "generation_dir", "resolve_image"}
NOT_QUERIES = {"write", "db_error", "require_writable"}  # the transaction, the translation, a flag check


def test_every_store_method_turns_a_raw_database_error_into_the_error_that_explains_it(filled: Path) -> None:
    store = open_store()
    subject = store.get_subject("cat")
    calls: dict[str, Callable[[], Any]] = {
        "subject_names": lambda: store.subject_names(),
        "find_subject": lambda: store.find_subject("cat"),
        "get_subject": lambda: store.get_subject("cat"),
        "list_subjects": lambda: store.list_subjects(),
        "subject_id_of": lambda: store.subject_id_of("cat"),
        "check_subject": lambda: store.check_subject("cat", subject.id),
        "update_subject": lambda: store.update_subject("cat", phrase="a cat"),
        "add_images": lambda: store.add_images("cat", []),
        "remove_subject": lambda: store.remove_subject("cat"),
        "remove_image": lambda: store.remove_image("cat", "1"),
        "set_captions": lambda: store.set_captions("cat", {}, "manual"),
        "create_run": lambda: store.create_run("cat", {}, "tiny"),
        "update_run": lambda: store.update_run(1, step=1),
        "finish_run": lambda: store.finish_run(1, "done"),
        "get_run": lambda: store.get_run("cat", 1),
        "list_runs": lambda: store.list_runs("cat"),
        "latest_done_run": lambda: store.latest_done_run("cat"),
        "remove_run": lambda: store.remove_run("cat", 1),
        "add_generation": lambda: store.add_generation(subject, {"prompt": "p"}),
        "get_generation": lambda: store.get_generation(1),
        "list_generations": lambda: store.list_generations("cat"),
        "set_generation_scores": lambda: store.set_generation_scores(1, {}),
        "cached_draft_prompt": lambda: store.cached_draft_prompt(subject, "p", "m", "h"),
        "cache_draft_prompt": lambda: store.cache_draft_prompt(subject, "p", "m", "h", "d"),
        "get_config": lambda: store.get_config("device"),
        "set_config": lambda: store.set_config("device", "cpu"),
        "all_config": lambda: store.all_config(),
        "unindexed_folders": lambda: store.unindexed_folders(),
        "missing_files": lambda: store.missing_files(),
        "clean": lambda: store.clean(),
        "repair": lambda: store.repair(),
        "close": lambda: store.close(),
    }
    public = {name for name in dir(store) if not name.startswith("_") and callable(getattr(store, name))}
    unlisted = public - set(calls) - PATH_HELPERS - NOT_QUERIES - {"integrity_problems"}
    assert not unlisted, f"add the new store methods to this test: {sorted(unlisted)}"
    real = store.db
    store.db = _BrokenDatabase(real)  # type: ignore[assignment]
    for name, call in calls.items():
        with pytest.raises(CorruptStoreError, match="is damaged"):
            call()
        assert not real.conn.in_transaction, name  # a failed write leaves no transaction open
    assert store.integrity_problems() == ["database disk image is malformed"]


def test_a_full_disk_while_adding_photos_is_disk_full(filled: Path, tmp_path: Path, monkeypatch) -> None:
    store = open_store()
    photo = prepare_image(make_photo(tmp_path / "new.jpg", seed=40))

    def full(target: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr("stencil_cli.store.subjects.atomic_write_bytes", full)
    with pytest.raises(DiskFullError, match="disk full at .*images"):
        store.add_images("cat", [photo])
    assert len(store.get_subject("cat").images) == 2  # no row without its file
