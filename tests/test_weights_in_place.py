"""Trained weights loaded into place: the subject model a run renders with is bit-identical to loading the
base model and then copying the run's tensors over it (the way stencil loaded them before)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from stencil_cli import models
from stencil_cli.core import weights
from stencil_cli.core.training import TrainConfig
from stencil_cli.verbs.generate import subject_pipeline


def _trained_file(tmp_path: Path, subject: Path, dtype: torch.dtype = torch.float32) -> Path:
    """A full run's weights file: the tiny decoder moved by a seeded update (what training leaves)."""
    unet = models.load_subject_pipeline(str(subject), device="cpu", precision="fp32").unet
    names = [name for name, _ in unet.named_parameters() if name.startswith("up_blocks.")]
    generator = torch.Generator().manual_seed(7)
    state = {
        name: (tensor + 1e-3 * torch.randn(tensor.shape, generator=generator)).to(dtype)
        for name, tensor in weights.trained_state(unet, names, torch.float32).items()
    }
    metadata = weights.weights_metadata(TrainConfig(), "tiny", names)
    return weights.save_trained_weights(tmp_path / "weights.safetensors", state, metadata)


def _overwritten(subject: Path, path: Path, precision: str) -> object:
    """The base pipeline loaded whole, then the run's tensors copied over it (the old way)."""
    pipe = models.load_subject_pipeline(str(subject), device="cpu", precision=precision)
    weights.load_trained_weights(pipe.unet, path)
    return pipe


def _image(pipe: object) -> torch.Tensor:
    """One small image from a fixed seed (plain text-to-image through the loaded pipeline)."""
    generator = torch.Generator("cpu").manual_seed(3)
    out = pipe(  # type: ignore[operator]
        "a toy robot", num_inference_steps=3, generator=generator, output_type="pt", height=64, width=64
    )
    return out.images


@pytest.mark.parametrize("file_dtype", [torch.float32, torch.float16])
def test_subject_model_with_trained_weights_is_bit_identical_to_base_then_overwrite(
    tmp_path: Path, tiny_models_dir: Path, file_dtype: torch.dtype
) -> None:
    subject = tiny_models_dir / "subject"
    path = _trained_file(tmp_path, subject, file_dtype)
    expected = _overwritten(subject, path, "fp32")
    run = SimpleNamespace(weights_file=path)
    with subject_pipeline(str(subject), run, device="cpu", precision="fp32") as pipe:  # type: ignore[arg-type]
        got = pipe.unet.state_dict()
        want = expected.unet.state_dict()  # type: ignore[attr-defined]
        assert got.keys() == want.keys()
        different = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
        assert different == []
        assert torch.equal(_image(pipe), _image(expected))


def test_base_decoder_weights_are_never_read_when_a_full_run_replaces_them(
    tmp_path: Path, tiny_models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors

    subject = tiny_models_dir / "subject"
    path = _trained_file(tmp_path, subject)
    read: list[tuple[str, str]] = []
    original = safetensors.safe_open

    class Spy:
        def __init__(self, filename: str, *args: object, **kwargs: object) -> None:
            self.filename = filename
            self.handle = original(filename, *args, **kwargs)

        def __enter__(self) -> Spy:
            self.handle.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            self.handle.__exit__(*exc)

        def get_tensor(self, name: str) -> torch.Tensor:
            read.append((Path(self.filename).parent.name, name))
            return self.handle.get_tensor(name)

        def __getattr__(self, attr: str) -> object:
            return getattr(self.handle, attr)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    run = SimpleNamespace(weights_file=path)
    with subject_pipeline(str(subject), run, device="cpu", precision="fp32") as pipe:  # type: ignore[arg-type]
        assert not any(p.is_meta for p in pipe.unet.parameters())
    base_reads = {name for folder, name in read if folder == "unet"}
    assert base_reads, "the base UNet was not read through safetensors at all"
    assert not [name for name in base_reads if name.startswith("up_blocks.")]
