"""A closed or binary stdin, and commands that remove things while another command uses the subject: one line
and the right exit code, nothing removed from under a running command, a consistent store after each."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from photos import add_subject
from storecheck import check_store

from stencil_cli.store.db import Store, open_store

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def _stencil(*args: str, stdin: Any = None, input: bytes | None = None, close_stdin: bool = False) -> Any:
    """Run `stencil ARGS` in a child process; `close_stdin` closes its fd 0 for real (as `<&-` does)."""
    return subprocess.run(
        [sys.executable, "-m", "stencil_cli", *args],
        cwd=PACKAGE_ROOT,
        env={**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)},
        stdin=stdin,
        input=input,
        capture_output=True,
        timeout=120,
        preexec_fn=(lambda: os.close(0)) if close_stdin else None,
    )


def _one_error(result: Any) -> str:
    stderr = result.stderr.decode()
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    assert "unexpected" not in stderr and "Traceback" not in stderr
    return " ".join(stderr.split())


def _done_run(store: Store) -> int:
    import numpy as np
    from safetensors.numpy import save_file

    run = store.create_run("robot", {"subject_model": "tiny", "resolution": 64}, base_model="tiny")
    weights = store.run_dir("robot", run.id) / "weights.safetensors"
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file({"up_blocks.0.weight": np.zeros(4, dtype=np.float32)}, str(weights))
    store.finish_run(run.id, "done", weights_file=weights)
    return run.id


@pytest.fixture
def robot(cli: Any, tmp_path: Path) -> Store:
    """`robot` with captioned photos and a done run."""
    store = add_subject(cli, tmp_path)
    subject = store.get_subject("robot")
    store.set_captions("robot", {image["id"]: "a photo of a toy robot" for image in subject.images}, "manual")
    _done_run(store)
    return store


# -- stdin -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["rm", "robot"], "refusing to remove 'robot' without confirmation: pass --yes"),
        (["rm", "robot", "--run", "1"], "refusing to remove run 1 of 'robot' without confirmation"),
        (["rm", "robot", "--image", "1"], "refusing to remove photo 1 of 'robot' without confirmation"),
        (["store", "clean", "--remove-unindexed", "ghost"], "refusing to remove the folder(s) ghost"),
        (["gen", "robot", "-"], "the prompt '-' reads from stdin, but stdin is closed"),
    ],
    ids=["rm", "rm-run", "rm-image", "clean-unindexed", "gen-stdin"],
)
@pytest.mark.parametrize("stdin", ["closed", "devnull"])
def test_a_closed_or_empty_stdin_is_one_line_and_removes_nothing(
    robot: Store, args: list[str], message: str, stdin: str
) -> None:
    (robot.root / "subjects" / "ghost" / "images").mkdir(parents=True)
    if stdin == "closed":
        result = _stencil(*args, close_stdin=True)
    else:
        result = _stencil(*args, stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result.stderr
    text = _one_error(result)
    if stdin == "closed" or args[0] != "gen":
        assert message in text, text
    else:
        assert "holds no prompt" in text, text
    store = open_store()
    assert store.subject_names() == ["robot"] and len(store.get_subject("robot").images) == 2
    assert [run.id for run in store.list_runs("robot")] == [1] and (
        robot.root / "subjects" / "ghost"
    ).is_dir()
    assert check_store(robot.root, allow_orphan_files=True) == ["subject folder without a row: ghost"]


@pytest.mark.parametrize("data", [b"\xff\xfe\x00binary\x00", "caf\xe9 on the moon\n".encode("latin-1")])
def test_gen_with_stdin_that_is_not_utf8_is_bad_input_like_a_prompts_file(robot: Store, data: bytes) -> None:
    result = _stencil("gen", "robot", "-", input=data)
    assert result.returncode == 2, result.stderr
    assert "stdin cannot be read as UTF-8 text" in _one_error(result)
    assert open_store().list_generations("robot") == []


# -- races -------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _in_use(name: str) -> Iterator[None]:
    """Another process holds subject `name` as gen, train, caption and eval do while they work."""
    code = (
        "import time\nfrom stencil_cli.store.db import open_store\n"
        "from stencil_cli.verbs.common import using_subject\n"
        f"with using_subject(open_store(), {name!r}):\n    print('using', flush=True)\n    time.sleep(120)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=PACKAGE_ROOT,
        env={**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)},
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "using"
        yield
    finally:
        holder.kill()
        holder.wait()


def test_rm_image_waits_for_a_command_using_the_subject_and_then_refuses(robot: Store, cli: Any) -> None:
    photo = robot.get_subject("robot").images[0]
    with _in_use("robot"):
        refused = cli("rm", "robot", "--image", str(photo["id"]), "--yes", "--wait", "0.2")
        assert refused.exit_code == 1, refused.output
        assert "in use by another stencil command" in " ".join(refused.stderr.split())
        assert Path(photo["file"]).is_file() and len(open_store().get_subject("robot").images) == 2
    assert check_store(robot.root) == []
    assert cli("rm", "robot", "--image", str(photo["id"]), "--yes", "--wait", "0").exit_code == 0
    assert check_store(robot.root) == []


def test_clean_leaves_the_new_files_of_a_subject_in_use_alone(robot: Store, cli: Any) -> None:
    draft = robot.subject_dir("robot") / "generations" / "001" / "draft-0.png"  # written before its row
    draft.parent.mkdir(parents=True)
    draft.write_bytes(b"png")
    with _in_use("robot"):
        result = cli("store", "clean", "--older-than", "0")
        assert result.exit_code == 0, result.output
        assert draft.is_file()
    assert check_store(robot.root) == []
    assert cli("store", "clean", "--older-than", "0").exit_code == 0
    assert not draft.exists()


def test_rm_run_and_prune_wait_for_a_gen_using_the_subject(robot: Store, cli: Any) -> None:
    weights = robot.run_dir("robot", 1) / "weights.safetensors"
    with _in_use("robot"):
        removal = cli("rm", "robot", "--run", "1", "--yes", "--wait", "0.2")
        assert removal.exit_code == 1, removal.output
        assert "in use by another stencil command" in " ".join(removal.stderr.split())
        pruned = cli("store", "prune", "--keep", "0", "--json")
        assert pruned.exit_code == 0, pruned.output
        assert json.loads(pruned.stdout)["skipped"] == ["robot"]
        assert weights.is_file() and [run.id for run in open_store().list_runs("robot")] == [1]
    assert check_store(robot.root) == []
    assert cli("rm", "robot", "--run", "1", "--yes").exit_code == 0
    assert check_store(robot.root) == []
