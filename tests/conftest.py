"""Shared fixtures: a temp store for every test, a CLI runner."""

from __future__ import annotations

import os
from pathlib import Path

# Tiny models gain nothing from threads, and OpenMP threads of several test processes on a 2-core machine
# spin against each other (100 tiny training steps: 3.5 s with one thread, minutes with two under load).
os.environ.setdefault("OMP_NUM_THREADS", "1")

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


# -- models: the tiny preset, built once per session ------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-wide tiny preset folder (``subject/`` and ``context/``), built once with save_pretrained."""
    from stencil_cli.models import ensure_tiny

    return ensure_tiny(tmp_path_factory.mktemp("tiny-models") / "tiny")


@pytest.fixture(scope="session")
def tiny_subject_pipe(tiny_models_dir: Path):
    """The tiny SD1.5-shaped pipeline (CPU, fp32), loaded once per session: shared, do not modify in place."""
    from stencil_cli.models import load_subject_pipeline

    return load_subject_pipeline(str(tiny_models_dir / "subject"), device="cpu", precision="fp32")


@pytest.fixture(scope="session")
def tiny_context_pipe(tiny_models_dir: Path):
    """The tiny SD3-shaped pipeline (CPU, fp32, no T5) from load_context_pipeline, once per session."""
    from stencil_cli.models import load_context_pipeline

    return load_context_pipeline(str(tiny_models_dir / "context"), device="cpu", precision="fp32")


@pytest.fixture
def tiny_preset(tiny_models_dir: Path, stencil_home: Path) -> Path:
    """Make the `tiny` preset available in this test's STENCIL_HOME (a symlink to the session build)."""
    target = stencil_home / "models" / "tiny"
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        target.symlink_to(tiny_models_dir, target_is_directory=True)
    return target


@pytest.fixture(scope="session")
def tiny_sdxl_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-wide tiny SDXL preset folder (``subject/``), built once with save_pretrained."""
    from stencil_cli.models.tiny import ensure_tiny_sdxl

    return ensure_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl-models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_sdxl_pipe(tiny_sdxl_models_dir: Path):
    """The tiny SDXL-shaped pipeline (CPU, fp32), loaded once per session: shared, do not modify in place."""
    from stencil_cli.models import load_subject_pipeline

    return load_subject_pipeline(str(tiny_sdxl_models_dir / "subject"), device="cpu", precision="fp32")


@pytest.fixture(params=["sd15", "sdxl"])
def family_pipe(request: pytest.FixtureRequest):
    """The tiny subject pipeline of each family (SD1.5, SDXL): a method test runs once per family."""
    return request.getfixturevalue("tiny_subject_pipe" if request.param == "sd15" else "tiny_sdxl_pipe")


@pytest.fixture
def tiny_sdxl_preset(tiny_sdxl_models_dir: Path, stencil_home: Path) -> Path:
    """Make the `tiny-sdxl` preset available in this test's STENCIL_HOME (a symlink to the session build)."""
    target = stencil_home / "models" / "tiny-sdxl"
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        target.symlink_to(tiny_sdxl_models_dir, target_is_directory=True)
    return target


@pytest.fixture(scope="session")
def tiny_drafts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Session-wide builds of the tiny draft presets: ``tiny-sd35/`` and ``tiny-flux/`` pipeline folders."""
    from stencil_cli.models import TINY_FLUX, TINY_SD35, ensure_local_preset

    root = tmp_path_factory.mktemp("tiny-drafts")
    for name in (TINY_SD35, TINY_FLUX):
        ensure_local_preset(name, root / name)
    return root


@pytest.fixture
def tiny_draft_presets(tiny_drafts_dir: Path, stencil_home: Path) -> Path:
    """Make `tiny-sd35` and `tiny-flux` available in this STENCIL_HOME (links to the session builds)."""
    models_dir = stencil_home / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    for build in tiny_drafts_dir.iterdir():
        target = models_dir / build.name
        if not target.exists():
            target.symlink_to(build, target_is_directory=True)
    return models_dir
