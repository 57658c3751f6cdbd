"""stencil's exports loaded by the real loaders of ComfyUI and the AUTOMATIC1111 Lora extension.

These tools are GPL/AGPL and are never part of stencil: point ``STENCIL_COMFYUI_DIR`` (and
``STENCIL_A1111_DIR``) at local checkouts to run these tests (``benchmarks/interop.py`` does the loading);
without them the tests skip. ComfyUI's import needs a few of its requirements in the environment
(einops, torchsde, scipy, psutil, pyyaml, av, sentencepiece)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

COMFYUI = os.environ.get("STENCIL_COMFYUI_DIR")
A1111 = os.environ.get("STENCIL_A1111_DIR")
pytestmark = pytest.mark.skipif(not COMFYUI, reason="STENCIL_COMFYUI_DIR names no ComfyUI checkout")


def _interop():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "interop.py"
    spec = importlib.util.spec_from_file_location("stencil_interop", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checks(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str, str], object]:
    """Every (tool, run, format) check of a full run and a LoRA run on the small SD1.5-topology model."""
    interop = _interop()
    work = tmp_path_factory.mktemp("interop")
    results = interop.run_checks(Path(COMFYUI), Path(A1111) if A1111 else None, None, work)
    return {(c.tool, c.run, c.format): c for c in results}


@pytest.mark.parametrize("run", ["full", "lora"])
@pytest.mark.parametrize("fmt", ["kohya", "single-file"])
def test_comfyui_loads_every_key_of_the_recommended_exports_with_the_trained_weights(
    checks, run, fmt
) -> None:
    check = checks[("ComfyUI", run, fmt)]
    assert check.loaded == check.keys and check.dropped == 0, check
    assert check.layers > 0 and check.max_diff < 1e-5, check


@pytest.mark.skipif(not A1111, reason="STENCIL_A1111_DIR names no stable-diffusion-webui checkout")
@pytest.mark.parametrize("run", ["full", "lora"])
def test_the_a1111_lora_extension_loads_every_key_of_the_kohya_export(checks, run) -> None:
    check = checks[("A1111 Lora", run, "kohya")]
    assert check.loaded == check.keys and check.dropped == 0, check
    assert check.layers > 0 and check.max_diff < 1e-5, check


@pytest.mark.parametrize("run", ["full", "lora"])
def test_the_diffusers_only_lora_format_is_what_comfyui_drops(checks, run) -> None:
    """docs/export.md says `lora` is for diffusers only: ComfyUI does not patch its attention layers."""
    check = checks[("ComfyUI", run, "lora")]
    assert check.dropped > 0
