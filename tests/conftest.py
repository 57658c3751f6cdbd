"""Shared fixtures: a temp store for every test, a CLI runner."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from stencil_cli.cli import app


@pytest.fixture(autouse=True)
def stencil_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own empty store and no network credentials."""
    home = tmp_path / "stencil-home"
    monkeypatch.setenv("STENCIL_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    return home


@pytest.fixture
def runner() -> CliRunner:
    """A CLI runner for the `stencil` app."""
    return CliRunner()


@pytest.fixture
def cli(runner: CliRunner):
    """Invoke `stencil ARGS...` in-process; returns the click Result."""

    def invoke(*args: str, input: str | None = None):
        return runner.invoke(app, [str(a) for a in args], input=input)

    return invoke
