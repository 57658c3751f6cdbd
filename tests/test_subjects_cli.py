"""`stencil add | ls | show | rm | store` through the CLI, on a temp store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from photos import make_photo
from storecheck import check_store

from stencil_cli.store.db import open_store

DREAMBENCH = Path(__file__).resolve().parents[2] / "shared" / "dreambench"


def _photos(folder: Path, count: int, start: int = 0) -> list[Path]:
    return [make_photo(folder / f"p{i}.jpg", seed=i) for i in range(start, start + count)]


def _store_files(home: Path) -> list[Path]:
    folder = home / "subjects"
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_add_creates_subject_and_json_parses(cli, tmp_path: Path) -> None:
    _photos(tmp_path / "cat", 3)
    result = cli("add", "mycat", tmp_path / "cat", "--phrase", "cat", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["created"] is True
    assert len(data["added"]) == 3
    assert data["subject"]["phrase"] == "cat"
    for image in data["subject"]["images"]:
        assert Path(image["file"]).is_file()
        assert len(image["sha256"]) == 64
        assert image["width"] == 320 and image["height"] == 288


def test_adding_same_photos_again_adds_nothing(cli, tmp_path: Path) -> None:
    _photos(tmp_path / "cat", 2)
    assert cli("add", "mycat", tmp_path / "cat").exit_code == 0
    again = cli("add", "mycat", tmp_path / "cat", tmp_path / "cat" / "p0.jpg", "--json")
    assert again.exit_code == 0, again.output
    data = json.loads(again.stdout)
    assert data["added"] == [] and data["created"] is False
    assert len(data["duplicates"]) == 3
    assert len(data["subject"]["images"]) == 2


def test_add_more_photos_to_existing_subject(cli, tmp_path: Path) -> None:
    _photos(tmp_path / "a", 2)
    _photos(tmp_path / "b", 1, start=5)
    assert cli("add", "mycat", tmp_path / "a", "--phrase", "cat").exit_code == 0
    result = cli("add", "mycat", tmp_path / "b")
    assert result.exit_code == 0
    assert "added 1 photo(s)" in result.stdout
    subject = open_store().get_subject("mycat")
    assert len(subject.images) == 3 and subject.phrase == "cat"


@pytest.mark.parametrize("bad_name", ["../x", "A B", "", "Cat", "a" * 65, "x/y", "caf\u00e9"])
def test_bad_subject_names_exit_2(cli, tmp_path: Path, stencil_home: Path, bad_name: str) -> None:
    photo = make_photo(tmp_path / "p.jpg")
    result = cli("add", bad_name, photo)
    assert result.exit_code == 2
    assert "invalid subject name" in result.stderr
    assert _store_files(stencil_home) == []


def test_bad_files_add_nothing_and_are_all_named(cli, tmp_path: Path, stencil_home: Path) -> None:
    folder = tmp_path / "mixed"
    _photos(folder, 2)
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(make_photo(tmp_path / "full.jpg", size=(600, 600)).read_bytes()[:1500])
    (folder / "notes.jpg").write_text("this is text")
    make_photo(folder / "tiny.png", size=(100, 100))
    result = cli("add", "mycat", folder)
    assert result.exit_code == 2
    for name in ("truncated.jpg", "notes.jpg", "tiny.png"):
        assert name in result.stderr
    assert "nothing added" in result.stderr
    assert open_store().subject_names() == []
    assert _store_files(stencil_home) == []


def test_skip_bad_adds_the_good_ones(cli, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    _photos(folder, 2)
    (folder / "notes.jpg").write_text("this is text")
    result = cli("add", "mycat", folder, "--skip-bad", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert len(data["added"]) == 2
    assert [Path(s["file"]).name for s in data["skipped"]] == ["notes.jpg"]


def test_missing_path_is_bad_input(cli, tmp_path: Path) -> None:
    result = cli("add", "mycat", tmp_path / "nope")
    assert result.exit_code == 2
    assert "no such file or folder" in result.stderr


def test_ls_and_show(cli, tmp_path: Path) -> None:
    assert json.loads(cli("ls", "--json").stdout) == []
    _photos(tmp_path / "d", 2)
    cli("add", "dog", tmp_path / "d", "--class", "dog")
    rows = json.loads(cli("ls", "--json").stdout)
    summary = [(r["name"], r["images"], r["class_word"], r["phrase"]) for r in rows]
    assert summary == [("dog", 2, "dog", "dog")]
    text = cli("ls")
    assert "dog" in text.stdout
    shown = cli("show", "dog")
    assert shown.exit_code == 0 and "320x288" in shown.stdout


def test_unknown_subject_suggests_close_names(cli, tmp_path: Path) -> None:
    _photos(tmp_path / "d", 1)
    cli("add", "doggo", tmp_path / "d")
    result = cli("show", "dogo")
    assert result.exit_code == 1
    assert "did you mean 'doggo'" in result.stderr
    assert "Traceback" not in result.output


def test_rm_subject_and_image(cli, tmp_path: Path, stencil_home: Path) -> None:
    _photos(tmp_path / "d", 3)
    cli("add", "dog", tmp_path / "d")
    subject = open_store().get_subject("dog")
    first = subject.images[0]
    result = cli("rm", "dog", "--image", str(first["id"]), "--yes")
    assert result.exit_code == 0, result.output
    assert not Path(first["file"]).exists()
    assert len(open_store().get_subject("dog").images) == 2
    by_hash = cli("rm", "dog", "--image", subject.images[1]["sha256"][:10], "--yes")
    assert by_hash.exit_code == 0
    assert cli("rm", "dog", "--image", "999", "--yes").exit_code == 1
    short = cli("rm", "dog", "--image", subject.images[2]["sha256"][:2] + "f", "--yes")
    assert short.exit_code == 2 and "use at least 4 characters" in short.output, short.output
    assert len(open_store().get_subject("dog").images) == 1  # nothing removed
    # no --yes on a non-interactive stdin: refused, nothing removed
    refused = cli("rm", "dog")
    assert refused.exit_code == 2 and "--yes" in refused.stderr
    assert cli("rm", "dog", "--yes").exit_code == 0
    assert open_store().subject_names() == []
    assert not (stencil_home / "subjects" / "dog").exists()
    assert cli("rm", "dog", "--yes").exit_code == 1


def test_rm_never_leaves_the_store(tmp_path: Path, stencil_home: Path) -> None:
    store = open_store()
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    with pytest.raises(Exception, match="not inside the store"):
        store._delete_tree(outside)
    assert (outside / "keep.txt").exists()


def test_store_path_and_version(cli, stencil_home: Path) -> None:
    assert cli("store", "path").stdout.strip() == str(stencil_home)
    assert cli("--version").stdout.startswith("stencil ")


def test_rich_markup_in_names_is_not_interpreted(cli, tmp_path: Path) -> None:
    make_photo(tmp_path / "[bold]x.jpg")
    result = cli("add", "mycat", tmp_path / "[bold]x.jpg", "--phrase", "cat")
    assert result.exit_code == 0
    open_store().update_subject("mycat", phrase="[red]cat")  # a store written before phrases were checked
    shown = cli("show", "mycat").stdout
    assert "[red]cat" in shown and "[bold]x.jpg" in shown


def _stencil(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "stencil_cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_processes_add_at_the_same_time(tmp_path: Path, stencil_home: Path) -> None:
    for who in ("a", "b"):
        _photos(tmp_path / who, 4, start=0 if who == "a" else 10)
    env = {**os.environ, "STENCIL_HOME": str(stencil_home)}
    procs = [
        _stencil("add", "shared", str(tmp_path / "a"), env=env),
        _stencil("add", "shared", str(tmp_path / "b"), env=env),
        _stencil("add", "solo", str(tmp_path / "a"), env=env),
    ]
    outcomes = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], outcomes
    store = open_store()
    assert len(store.get_subject("shared").images) == 8
    assert len(store.get_subject("solo").images) == 4
    assert len(list(store.db.query("select * from subjects"))) == 2
    assert check_store(stencil_home) == []


@pytest.mark.parametrize("crash_at", ["add:file-written", "add:files-written"])
def test_sigkill_during_add_leaves_nothing_to_trip_over(
    tmp_path: Path, stencil_home: Path, crash_at: str
) -> None:
    folder = tmp_path / "many"
    _photos(folder, 4)
    env = {**os.environ, "STENCIL_HOME": str(stencil_home), "STENCIL_CRASH_AT": crash_at}
    killed = subprocess.run(
        [sys.executable, "-m", "stencil_cli", "add", "big", str(folder)],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert killed.returncode == -signal.SIGKILL
    assert list((stencil_home / "subjects" / "big" / "images").iterdir())  # it died after writing files
    env.pop("STENCIL_CRASH_AT")
    store = open_store()
    assert store.subject_names() == []  # no subject row, no orphan image rows
    assert list(store.db.query("select * from images")) == []
    listed = subprocess.run(
        [sys.executable, "-m", "stencil_cli", "ls", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0 and json.loads(listed.stdout) == []
    retry = subprocess.run(
        [sys.executable, "-m", "stencil_cli", "add", "big", str(folder), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert retry.returncode == 0, retry.stderr
    assert len(json.loads(retry.stdout)["added"]) == 4
    store.clean(min_age_s=0)
    rows = {row["file"] for row in store.db.query("select file from images")}
    assert {store.relative(p) for p in _store_files(stencil_home)} == rows
    assert check_store(stencil_home) == []


def test_store_clean_removes_leftovers(tmp_path: Path, stencil_home: Path, cli) -> None:
    _photos(tmp_path / "d", 1)
    cli("add", "dog", tmp_path / "d")
    stray = stencil_home / "subjects" / "dog" / "images" / ("0" * 64 + ".png")
    stray.write_bytes(b"x")
    ghost = stencil_home / "subjects" / "ghost" / "images"
    ghost.mkdir(parents=True)
    orphan_run = stencil_home / "subjects" / "dog" / "runs" / "7"
    orphan_run.mkdir(parents=True)
    (orphan_run / "weights.safetensors").write_bytes(b"partial")
    fresh = cli("store", "clean")  # default: leaves recent files alone (another process may own them)
    assert fresh.exit_code == 0 and "removed 0" in fresh.stdout
    assert stray.exists() and ghost.exists() and orphan_run.exists()
    result = cli("store", "clean", "--older-than", "0")
    assert result.exit_code == 0 and "removed 2" in result.stdout
    assert not stray.exists() and not orphan_run.exists()
    assert ghost.exists()  # a subject folder without a row is only removed when named
    assert len(open_store().get_subject("dog").images) == 1
    assert open_store().clean(min_age_s=0, remove_unindexed={"ghost"}) == [ghost.parent]
    assert not ghost.parent.exists()


def test_help_lists_the_commands(cli) -> None:
    result = cli("--help")
    assert result.exit_code == 0
    for command in ("add", "ls", "show", "rm", "store"):
        assert command in result.stdout


@pytest.mark.skipif(not (DREAMBENCH / "dog").is_dir(), reason="shared/dreambench is not present")
def test_real_dreambench_photos(cli) -> None:
    first = cli("add", "dog", DREAMBENCH / "dog", "--class", "dog", "--json")
    assert first.exit_code == 0, first.output
    assert len(json.loads(first.stdout)["added"]) == 5
    shown = json.loads(cli("show", "dog", "--json").stdout)
    assert len(shown["images"]) == 5
    assert all(image["width"] >= 512 and len(image["sha256"]) == 64 for image in shown["images"])
    again = json.loads(cli("add", "dog", DREAMBENCH / "dog", "--json").stdout)
    assert again["added"] == []


def test_many_processes_open_a_new_store_at_once(tmp_path: Path) -> None:
    home = tmp_path / "fresh-store"
    env = {**os.environ, "STENCIL_HOME": str(home)}
    procs = [_stencil("ls", "--json", env=env) for _ in range(4)]
    outcomes = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 4, outcomes
    assert all(json.loads(out) == [] for out, _ in outcomes)


def test_rm_refuses_a_subject_that_is_being_trained(cli, tmp_path: Path) -> None:
    from stencil_cli.verbs.common import subject_lock

    _photos(tmp_path / "d", 1)
    cli("add", "dog", tmp_path / "d")
    code = (
        "import time\nfrom stencil_cli.store.db import open_store\n"
        "from stencil_cli.verbs.common import subject_lock\n"
        "with subject_lock(open_store(), 'dog'):\n    print('locked', flush=True)\n    time.sleep(30)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        refused = cli("rm", "dog", "--yes")
        assert refused.exit_code == 1 and "being trained" in refused.stderr
        assert open_store().subject_names() == ["dog"]
    finally:
        holder.kill()
        holder.wait()
    with subject_lock(open_store(), "dog"):
        pass  # the lock is free again once its holder is gone
    assert cli("rm", "dog", "--yes").exit_code == 0


def test_names_starting_with_a_dash_are_refused(cli, tmp_path: Path) -> None:
    photo = make_photo(tmp_path / "p.jpg")
    result = cli("add", "--", "-x", photo)
    assert result.exit_code == 2 and "invalid subject name" in result.stderr
