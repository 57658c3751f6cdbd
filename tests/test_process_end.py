"""The end of an ML command's process: no interpreter teardown, but the exit code, the output and the store
are as an ordinary exit leaves them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stencil_cli.cli.ending import exit_status

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
{torch}
from stencil_cli.store.db import open_store
store = open_store()
print("x" * 100000)  # more than a pipe's buffer: it must be flushed, not lost
sys.stderr.write("said on stderr")
from stencil_cli.cli.ending import end_process
end_process({code!r})
print("ended the ordinary way")
"""


def _run(tmp_path: Path, code: object, torch: bool) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "STENCIL_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}
    script = SCRIPT.format(torch="import torch" if torch else "", code=code)
    return subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.mark.parametrize("code", [0, 3, None])
def test_an_ml_process_ends_with_its_code_its_output_flushed_and_the_store_closed(
    tmp_path: Path, code: object
) -> None:
    done = _run(tmp_path, code, torch=True)
    assert done.returncode == (code or 0)
    assert done.stdout == "x" * 100000 + "\n"  # nothing after end_process ran
    assert done.stderr.endswith("said on stderr")
    home = tmp_path / "home"
    assert (home / "stencil.db").is_file()
    assert not (home / "stencil.db-wal").exists()  # the connection was closed (WAL checkpointed, removed)


def test_a_message_exit_code_is_printed_and_ends_with_status_1(tmp_path: Path) -> None:
    done = _run(tmp_path, "error: something", torch=True)
    assert done.returncode == 1
    assert "error: something" in done.stderr


def test_a_process_without_torch_ends_the_ordinary_way(tmp_path: Path) -> None:
    done = _run(tmp_path, 0, torch=False)
    assert done.returncode == 0
    assert done.stdout.endswith("ended the ordinary way\n")


def test_exit_status_follows_sys_exit() -> None:
    assert exit_status(None) == 0
    assert exit_status(2) == 2
    assert exit_status(False) == 0
