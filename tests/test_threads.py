"""CPU thread defaults (base.threads): never more threads than free cores, the user's choice wins."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stencil_cli.base import threads


def test_default_uses_the_free_cores_of_the_process_affinity_capped() -> None:
    assert threads.default_threads(cores=2, busy=0.0) == 2
    assert threads.default_threads(cores=2, busy=0.3) == 2  # background noise is an idle machine
    assert threads.default_threads(cores=2, busy=1.0) == 1  # one core busy elsewhere: one thread
    assert threads.default_threads(cores=2, busy=5.4) == 1  # overloaded: one thread, never zero
    assert threads.default_threads(cores=64, busy=0.0) == threads.MAX_DEFAULT_THREADS
    assert threads.default_threads(cores=16, busy=11.6) == 4


def test_available_cores_follow_the_affinity_not_the_machine() -> None:
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this platform")
    assert threads.available_cores() == len(os.sched_getaffinity(0))


def test_configure_threads_applies_the_request_and_rejects_nonsense(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    try:
        assert threads.configure_threads(2) == 2
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # an explicit OpenMP setting is the user's choice
        assert threads.configure_threads(None) == 1
        assert torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(threads, "busy_cores", lambda: 0.0)
        monkeypatch.setattr(threads, "available_cores", lambda: 3)
        assert threads.configure_threads(None) == 3
        with pytest.raises(ValueError, match="at least 1"):
            threads.configure_threads(0)
    finally:
        torch.set_num_threads(before)


def test_before_torch_is_imported_it_sets_the_threads_and_a_passive_wait_through_the_environment() -> None:
    code = (
        "import sys; from stencil_cli.base.threads import configure_threads; n = configure_threads(1); "
        "assert 'torch' not in sys.modules; import os, torch; "
        "print(n, torch.get_num_threads(), os.environ['OMP_WAIT_POLICY'])"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "1", "PASSIVE"]
