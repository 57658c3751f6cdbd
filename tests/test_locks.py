"""Subject locks: many shared users at once, an exclusive holder alone, released when the holder dies."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from stencil_cli.base.locks import SubjectInUseError, is_in_use, subject_in_use


def _holder(root: Path, name: str, exclusive: bool) -> subprocess.Popen[str]:
    code = (
        "import sys, time\nfrom stencil_cli.base.locks import subject_in_use\n"
        f"with subject_in_use({str(root)!r}, {name!r}, exclusive={exclusive}):\n"
        "    print('held', flush=True)\n    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_shared_users_coexist_and_keep_an_exclusive_one_out(tmp_path: Path) -> None:
    gen = _holder(tmp_path, "dog", exclusive=False)
    try:
        assert is_in_use(tmp_path, "dog") and not is_in_use(tmp_path, "cat")
        with subject_in_use(tmp_path, "dog"):  # a second gen of the same subject
            pass
        with subject_in_use(tmp_path, "cat", exclusive=True):  # another subject is free
            pass
        start = time.monotonic()
        with (
            pytest.raises(SubjectInUseError, match="'dog' is in use by another stencil command") as caught,
            subject_in_use(tmp_path, "dog", exclusive=True, wait_s=0.5, purpose="removing"),
        ):
            pytest.fail("rm got the subject while a gen used it")
        assert 0.4 < time.monotonic() - start < 5 and "waited 0.5 s" in str(caught.value)
    finally:
        gen.kill()
        gen.wait()
    with subject_in_use(tmp_path, "dog", exclusive=True):  # the OS released the killed holder's lock
        assert is_in_use(tmp_path, "dog")
    assert not is_in_use(tmp_path, "dog")


def test_an_exclusive_holder_keeps_users_out_and_a_waiter_gets_in_after_it(tmp_path: Path) -> None:
    rm = _holder(tmp_path, "dog", exclusive=True)
    try:
        with (
            pytest.raises(SubjectInUseError, match="being removed or changed"),
            subject_in_use(tmp_path, "dog"),
        ):
            pass
        threading.Timer(0.5, rm.kill).start()
        with subject_in_use(tmp_path, "dog", wait_s=20):  # waits for the holder to go
            pass
    finally:
        rm.kill()
        rm.wait()
