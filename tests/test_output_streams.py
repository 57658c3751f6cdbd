"""stdout on a full device (`> /dev/full`) and into a pipe whose reader went away (`| head -1` under
`set -o pipefail`): one line and exit 1 for the first, a quiet exit 0 for the second; never a traceback,
"Exception ignored" or exit 120."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from photos import add_subject
from storecheck import check_store

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
COMMANDS = [
    ["ls", "--json"],
    ["ls"],
    ["images", "robot", "--json"],
    ["show", "robot"],
    ["--help"],
    ["gen", "--help"],
]
IDS = ["ls-json", "ls", "images-json", "show", "help", "gen-help"]


def _run(args: list[str], stdout: Any) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stencil_cli", *args],
        cwd=PACKAGE_ROOT,
        env={**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)},
        stdout=stdout,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        timeout=120,
    )


@pytest.fixture
def robot(cli: Any, tmp_path: Path) -> Path:
    return add_subject(cli, tmp_path).root


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("args", COMMANDS, ids=IDS)
def test_stdout_on_a_full_device_is_one_line_and_exit_1(robot: Path, args: list[str]) -> None:
    with open("/dev/full", "w") as full:
        result = _run(args, full)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip() == "error: cannot write the output to stdout (No space left on device)"
    assert check_store(robot) == []


@pytest.mark.parametrize("args", COMMANDS, ids=IDS)
def test_stdout_into_a_pipe_closed_by_its_reader_exits_0_quietly(robot: Path, args: list[str]) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte, as `head -1` is after its line
    try:
        result = _run(args, write_end)
    finally:
        os.close(write_end)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_ctrl_c_while_the_interpreter_shuts_down_exits_130_without_exception_noise(robot: Path) -> None:
    # a slow atexit callback stands for what a long command leaves to the shutdown (bench's thread pools,
    # torch's and tqdm's callbacks): Ctrl-C there used to print "Exception ignored in atexit callback"
    code = (
        "import atexit, sys, time\natexit.register(time.sleep, 30)\n"
        "sys.argv = ['stencil', 'store', 'path']\nfrom stencil_cli.cli import app\napp(prog_name='stencil')\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], cwd=PACKAGE_ROOT, env={**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert child.stdout is not None and child.stdout.readline().strip() == str(robot)
    time.sleep(1.0)  # the command has returned; the interpreter is in its atexit callbacks
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=20)
    assert child.returncode == 130, stderr
    assert "Exception ignored" not in stderr and "KeyboardInterrupt" not in stderr
