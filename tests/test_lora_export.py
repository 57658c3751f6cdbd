"""LoRA training through peft, loading either kind of run, exports other tools load (tiny preset)."""

from __future__ import annotations

import copy
import json
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from runs import eval_loss
from safetensors import safe_open
from safetensors.torch import load_file

from stencil_cli.base.errors import BadInputError
from stencil_cli.core import export as ex
from stencil_cli.core.generation import GenerationSettings, plain_generate
from stencil_cli.core.training import TrainConfig, TrainingData, train_unet
from stencil_cli.core.weights import (
    load_trained_weights,
    save_trained_weights,
    trained_state,
    weights_metadata,
)
from stencil_cli.models import load_subject_pipeline


def _config(**overrides: object) -> TrainConfig:
    values: dict[str, object] = {
        "steps": 4,
        "batch_size": 2,
        "lr": 1e-3,
        "resolution": 64,
        "save_dtype": "fp32",
    }
    values.update(overrides)
    return TrainConfig(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def data() -> TrainingData:
    """Synthetic latents, caption embeddings and masks shaped for the tiny UNet."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 8, 8, generator=generator)
    embeddings = torch.randn(3, 77, 32, generator=generator)
    masks = (torch.rand(3, 1, 8, 8, generator=generator) > 0.3).float()
    return TrainingData(latents, embeddings, masks, None)


def _run_file(pipe, data, folder: Path, name: str, config: TrainConfig) -> tuple[Path, torch.nn.Module]:
    unet = copy.deepcopy(pipe.unet)
    result = train_unet(unet, pipe.scheduler, data, config)
    path = folder / f"{name}.safetensors"
    metadata = weights_metadata(config, "tiny", result.names, subject="robot", phrase="toy robot", run_id="7")
    save_trained_weights(path, trained_state(unet, result.names, torch.float32), metadata)
    return path, unet


@pytest.fixture(scope="module")
def runs(tiny_subject_pipe, data, tmp_path_factory):
    """A full-decoder run and a rank-4 LoRA run (alpha 8), as weights files plus their trained UNets."""
    folder = tmp_path_factory.mktemp("runs")
    full, full_unet = _run_file(tiny_subject_pipe, data, folder, "full", _config())
    lora, lora_unet = _run_file(tiny_subject_pipe, data, folder, "lora", _config(lora_rank=4, lora_alpha=8.0))
    return {"full": full, "lora": lora, "full_unet": full_unet, "lora_unet": lora_unet}


SAMPLE = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
TEXT = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(6))


def _call(unet) -> torch.Tensor:
    with torch.no_grad():
        return unet(SAMPLE, 300, encoder_hidden_states=TEXT).sample


def _fresh_pipe(tiny_models_dir: Path):
    return load_subject_pipeline(str(tiny_models_dir / "subject"), device="cpu", precision="fp32")


# -- LoRA training ---------------------------------------------------------------------------------


def test_lora_training_moves_only_adapters_and_lowers_the_loss(tiny_subject_pipe, data) -> None:
    """Every base weight stays bit-identical; only decoder attention adapters change; the loss falls."""
    base = {k: v.clone() for k, v in tiny_subject_pipe.unet.state_dict().items()}
    unet = copy.deepcopy(tiny_subject_pipe.unet)
    before = eval_loss(unet, tiny_subject_pipe, data)
    result = train_unet(
        unet, tiny_subject_pipe.scheduler, data, _config(steps=30, batch_size=3, lr=3e-2, lora_rank=4)
    )
    assert eval_loss(unet, tiny_subject_pipe, data) < 0.9 * before
    assert result.names and all(".lora_" in n and n.startswith("up_blocks.") for n in result.names)
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in result.names}
    assert targets == {"to_q", "to_k", "to_v", "0"}  # to_out.0
    after = unet.state_dict()
    for name, tensor in after.items():
        if ".lora_" in name:
            continue
        original = name.replace(".base_layer.", ".")
        assert torch.equal(tensor, base[original]), f"{original} changed"
    moved = [n for n in result.names if not torch.equal(after[n], torch.zeros_like(after[n]))]
    assert any(".lora_B." in n for n in moved)  # B starts at zero: it moved


def test_lora_run_file_records_its_kind_and_loads_into_a_plain_unet(tiny_subject_pipe, runs) -> None:
    """The file says kind lora, rank, alpha; loading merges it: a plain UNet matching the adapter model."""
    with safe_open(str(runs["lora"]), framework="pt") as handle:
        metadata = handle.metadata()
        keys = list(handle.keys())
    assert metadata["kind"] == "lora" and metadata["lora_rank"] == "4" and float(metadata["lora_alpha"]) == 8
    assert all(".lora_A." in k or ".lora_B." in k for k in keys)
    fresh = copy.deepcopy(tiny_subject_pipe.unet)
    load_trained_weights(fresh, runs["lora"])
    assert not any(".lora_" in n for n, _ in fresh.named_parameters())
    torch.testing.assert_close(_call(fresh), _call(runs["lora_unet"]), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(_call(fresh), _call(tiny_subject_pipe.unet), atol=1e-4)
    with safe_open(str(runs["full"]), framework="pt") as handle:
        assert handle.metadata()["kind"] == "full"


def test_lora_alpha_scales_the_merged_update(tiny_subject_pipe, runs, tmp_path: Path) -> None:
    """Doubling alpha in the file doubles the weight change the loader merges."""
    tensors = load_file(str(runs["lora"]))
    with safe_open(str(runs["lora"]), framework="pt") as handle:
        metadata = dict(handle.metadata())
    doubled = tmp_path / "double.safetensors"
    save_trained_weights(doubled, tensors, {**metadata, "lora_alpha": "16.0"})
    name = next(k for k in tensors if ".lora_A." in k).split(".lora_A.")[0] + ".weight"
    deltas = []
    for path in (runs["lora"], doubled):
        unet = copy.deepcopy(tiny_subject_pipe.unet)
        load_trained_weights(unet, path)
        deltas.append(unet.state_dict()[name] - tiny_subject_pipe.unet.state_dict()[name])
    assert deltas[0].abs().max() > 0
    torch.testing.assert_close(deltas[1], 2 * deltas[0], rtol=1e-4, atol=1e-7)


def test_a_lora_run_generates(tiny_models_dir, runs) -> None:
    """Plain generation with a LoRA run's weights works and differs from the base model's image."""
    settings = GenerationSettings(steps=3)
    base = _fresh_pipe(tiny_models_dir)
    tuned = _fresh_pipe(tiny_models_dir)
    load_trained_weights(tuned.unet, runs["lora"])
    images = [
        np.asarray(plain_generate(p, "a toy robot", 0, settings), dtype=np.int16) for p in (base, tuned)
    ]
    assert images[0].shape == images[1].shape == (64, 64, 3)
    assert np.abs(images[0] - images[1]).max() > 0


def test_bad_lora_settings_are_refused() -> None:
    """Rank below 1 and a non-positive alpha are BadInputError."""
    with pytest.raises(BadInputError, match="rank"):
        _config(lora_rank=0).validate()
    with pytest.raises(BadInputError, match="alpha"):
        _config(lora_rank=4, lora_alpha=0.0).validate()


# -- LoRA exports ----------------------------------------------------------------------------------


def _load_lora_quietly(pipe, path: Path, caplog) -> str:
    """load_lora_weights, returning every log line and warning it produced (lower case)."""
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        pipe.load_lora_weights(str(path))
    lines = caplog.text.splitlines() + [str(w.message) for w in caught]
    return "\n".join(line for line in lines if "no lora keys associated to cliptextmodel" not in line.lower())


@pytest.mark.parametrize("fmt", ["lora", "kohya"])
def test_lora_run_exports_load_in_diffusers_and_match(
    tiny_subject_pipe, tiny_models_dir, runs, tmp_path: Path, caplog, fmt: str
) -> None:
    """A LoRA run's export loads with load_lora_weights, no unexpected keys, and gives stencil's outputs."""
    target = tmp_path / f"robot-{fmt}.safetensors"
    result = ex.export_run(tiny_subject_pipe, runs["lora"], fmt, target, save_dtype="fp32")
    assert result.kind == "lora" and result.rank == 4 and result.error is None
    keys = list(load_file(str(target)))
    if fmt == "kohya":
        assert all(k.startswith("lora_unet_") for k in keys)
        assert any(k.endswith(".alpha") for k in keys) and any(".lora_down." in k for k in keys)
    else:
        assert all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    pipe = _fresh_pipe(tiny_models_dir)
    log = _load_lora_quietly(pipe, target, caplog)
    assert "unexpected keys" not in log and "missing" not in log and "no lora keys" not in log.lower()
    stencil = copy.deepcopy(tiny_subject_pipe.unet)
    load_trained_weights(stencil, runs["lora"])
    torch.testing.assert_close(_call(pipe.unet), _call(stencil), rtol=1e-4, atol=1e-5)
    with safe_open(str(target), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["run_kind"] == "lora" and meta["phrase"] == "toy robot" and meta["base_model"] == "tiny"
    card = result.card.read_text(encoding="utf-8")
    assert result.card == tmp_path / f"robot-{fmt}.README.md"
    assert "toy robot" in card and "load_lora_weights" in card and "Context Guidance" in card


def _linear_and_conv_only(base_unet, trained_unet):
    """The base UNet with only the trained Linear/Conv2d weights (what a LoRA can carry) taken over."""
    out = copy.deepcopy(base_unet)
    trained = dict(trained_unet.named_parameters())
    with torch.no_grad():
        for module_name, module in out.named_modules():
            if module_name.startswith("up_blocks.") and isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                module.weight.copy_(trained[f"{module_name}.weight"])
    return out


def test_svd_extraction_at_full_rank_reproduces_the_difference(tiny_subject_pipe, runs) -> None:
    """At the largest rank every LoRA layer is exact; what remains is the biases and norms, reported."""
    tensors = load_file(str(runs["full"]))
    shapes = [tuple(t.shape) for n, t in tensors.items() if n.endswith("weight") and t.dim() >= 2]
    full_rank = ex.max_extraction_rank(shapes)
    pairs, error = ex.svd_extract(tiny_subject_pipe.unet, tensors, full_rank)
    assert error.worst < 1e-4
    assert error.left_out_tensors > 0 and error.overall == pytest.approx(error.left_out, rel=1e-3)
    for module, (down, up) in pairs.items():
        base = tiny_subject_pipe.unet.get_submodule(module).weight
        diff = tensors[f"{module}.weight"] - base
        torch.testing.assert_close(ex.lora_delta(down, up), diff, rtol=1e-4, atol=1e-5)


def test_svd_error_falls_as_the_rank_grows(tiny_subject_pipe, runs) -> None:
    """Relative error of the difference: strictly lower at each larger rank, overall and worst layer."""
    tensors = load_file(str(runs["full"]))
    errors = [ex.svd_extract(tiny_subject_pipe.unet, tensors, rank)[1] for rank in (1, 4, 16, 64)]
    overall = [e.overall for e in errors]
    assert overall == sorted(overall, reverse=True) and len(set(overall)) == 4
    assert errors[0].worst > errors[-1].worst and 0 < errors[0].overall <= 1


@pytest.mark.parametrize("fmt", ["lora", "kohya"])
def test_full_run_lora_extraction_loads_and_matches_the_linear_layers(
    tiny_subject_pipe, tiny_models_dir, runs, tmp_path: Path, caplog, fmt: str
) -> None:
    """At full rank the exported LoRA, loaded by diffusers, equals the run's Linear/Conv2d weight change."""
    target = tmp_path / f"extracted-{fmt}.safetensors"
    result = ex.export_run(tiny_subject_pipe, runs["full"], fmt, target, rank=64, save_dtype="fp32")
    assert result.kind == "full" and result.error is not None and result.error.worst < 1e-4
    pipe = _fresh_pipe(tiny_models_dir)
    assert "unexpected keys" not in _load_lora_quietly(pipe, target, caplog)
    expected = _linear_and_conv_only(tiny_subject_pipe.unet, runs["full_unet"])
    torch.testing.assert_close(_call(pipe.unet), _call(expected), rtol=1e-3, atol=1e-4)
    assert "SVD at rank 64" in result.card.read_text(encoding="utf-8")


# -- full exports ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_diffusers_folder_gives_the_unet_stencil_generates_with(
    tiny_models_dir, runs, tmp_path, kind
) -> None:
    """from_pretrained on the exported folder gives a UNet equal to the base plus the run's weights."""
    from diffusers import StableDiffusionPipeline

    target = tmp_path / "robot-pipeline"
    result = ex.export_run(_fresh_pipe(tiny_models_dir), runs[kind], "diffusers", target, save_dtype="fp32")
    assert result.card == target / "README.md" and result.card.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
    loaded = StableDiffusionPipeline.from_pretrained(str(target))
    stencil = _fresh_pipe(tiny_models_dir).unet
    load_trained_weights(stencil, runs[kind])
    reference = stencil.state_dict()
    assert all(torch.equal(t, reference[k]) for k, t in loaded.unet.state_dict().items())
    assert json.loads((target / "stencil_export.json").read_text())["run_kind"] == kind


def test_the_diffusers_folder_tokenizer_loads_from_vocab_and_merges_alone(
    tiny_models_dir, runs, tmp_path
) -> None:
    """transformers 4.x's slow CLIPTokenizer (diffusers 0.32 + transformers 4.54) reads vocab + merges."""
    import shutil

    from transformers import CLIPTokenizer

    target = tmp_path / "robot-pipeline"
    ex.export_run(_fresh_pipe(tiny_models_dir), runs["full"], "diffusers", target, save_dtype="fp32")
    folder = target / "tokenizer"
    assert {"tokenizer.json", "vocab.json", "merges.txt"} <= {p.name for p in folder.iterdir()}
    slow_only = tmp_path / "slow-tokenizer"
    shutil.copytree(folder, slow_only, ignore=shutil.ignore_patterns("tokenizer.json"))
    fast = _fresh_pipe(tiny_models_dir).tokenizer
    slow = CLIPTokenizer(
        vocab=str(slow_only / "vocab.json"), merges=str(slow_only / "merges.txt"), model_max_length=77
    )
    prompt = "a photo of a toy robot on the beach"
    assert slow(prompt).input_ids == fast(prompt).input_ids
    assert CLIPTokenizer.from_pretrained(str(slow_only))(prompt).input_ids == fast(prompt).input_ids


def test_single_file_round_trips_through_from_single_file(tiny_models_dir, runs, tmp_path: Path) -> None:
    """The original-layout file loads back with diffusers' from_single_file: UNet, VAE, text encoder equal."""
    from diffusers import StableDiffusionPipeline

    target = tmp_path / "robot.safetensors"
    source = _fresh_pipe(tiny_models_dir)
    ex.export_run(source, runs["full"], "single-file", target, save_dtype="fp32")
    keys = list(load_file(str(target)))
    assert any(k.startswith("model.diffusion_model.output_blocks.") for k in keys)
    assert any(k.startswith("first_stage_model.decoder.up.") for k in keys)
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in keys)
    loaded = StableDiffusionPipeline.from_single_file(
        str(target), config=str(tiny_models_dir / "subject"), local_files_only=True
    )
    for component in ("unet", "vae", "text_encoder"):
        mine = getattr(source, component).state_dict()
        theirs = getattr(loaded, component).state_dict()
        assert all(torch.equal(theirs[k], mine[k]) for k in mine if not k.endswith("position_ids")), component
    assert not torch.equal(
        loaded.unet.state_dict()["up_blocks.1.resnets.0.conv1.weight"],
        _fresh_pipe(tiny_models_dir).unet.state_dict()["up_blocks.1.resnets.0.conv1.weight"],
    )


def test_original_names_of_the_full_size_sd15_layout() -> None:
    """On the real SD1.5 architecture (meta device) the names are the original checkpoint's."""
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from fullsize import build_full_size_component

    unet = build_full_size_component("sd15", "unet", device="meta")
    vae = build_full_size_component("sd15", "vae", device="meta")
    names = {o for o, _ in ex._unet_original_names(unet).values()}
    vae_names = ex._vae_original_names(vae)
    assert len(names) == 686 and len(vae_names) == 248  # the original SD1.5 checkpoint's counts
    assert CHECKPOINT_KEY_NAMES["v1"] in names  # diffusers' own test for an SD1 checkpoint
    prefix = "model.diffusion_model."
    for sampler in (
        "input_blocks.3.0.op",
        "input_blocks.9.0.op",
        "output_blocks.2.1.conv",
        "output_blocks.8.2.conv",
    ):
        assert f"{prefix}{sampler}.weight" in names
    assert f"{prefix}output_blocks.11.0.in_layers.0.weight" in names
    assert vae_names["decoder.mid_block.attentions.0.to_q.weight"] == (
        "first_stage_model.decoder.mid.attn_1.q.weight",
        True,
    )


# -- refusals and overwrite safety ---------------------------------------------------------------------------


def test_bad_export_requests_are_refused_and_write_nothing(tiny_subject_pipe, runs, tmp_path: Path) -> None:
    """Unknown format, bad ranks, a missing folder, an existing file: BadInputError, nothing written."""
    pipe = tiny_subject_pipe
    target = tmp_path / "out.safetensors"
    cases = [
        (dict(fmt="onnx", target=target), "unknown export format"),
        (dict(fmt="lora", target=target, rank=0), "rank must be a positive"),
        (dict(fmt="lora", target=target, rank=-3), "rank must be a positive"),
        (dict(fmt="lora", target=target, rank=65), "at most 64"),
        (dict(fmt="lora", target=tmp_path / "missing" / "x.safetensors"), "does not exist"),
        (dict(fmt="diffusers", target=tmp_path / "folder", rank=4), "only to the lora and kohya"),
    ]
    for kwargs, message in cases:
        fmt, path = kwargs.pop("fmt"), kwargs.pop("target")
        with pytest.raises(BadInputError, match=message):
            ex.export_run(pipe, runs["full"], fmt, path, save_dtype="fp32", **kwargs)
    with pytest.raises(BadInputError, match="trained rank"):
        ex.export_run(pipe, runs["lora"], "lora", target, rank=8)
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"keep me")
    with pytest.raises(BadInputError, match="already exists"):
        ex.export_run(pipe, runs["lora"], "lora", target)
    assert target.read_bytes() == b"keep me"


def test_force_replaces_an_existing_export_atomically(tiny_subject_pipe, runs, tmp_path: Path) -> None:
    """With force the file and its card are replaced; no temp files remain beside them."""
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"old")
    ex.export_run(tiny_subject_pipe, runs["lora"], "lora", target, force=True)
    assert set(load_file(str(target))) and target.read_bytes() != b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.README.md", "out.safetensors"]
    folder = tmp_path / "pipe"
    folder.mkdir()
    (folder / "stale.txt").write_text("x")
    with pytest.raises(BadInputError, match="already exists"):
        ex.export_run(copy.deepcopy(tiny_subject_pipe), runs["lora"], "diffusers", folder)
    ex.export_run(copy.deepcopy(tiny_subject_pipe), runs["lora"], "diffusers", folder, force=True)
    assert not (folder / "stale.txt").exists() and (folder / "model_index.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("fmt", ["single-file", "diffusers"])
def test_an_fp16_export_keeps_updates_fp16_would_round_away(
    tiny_models_dir, tmp_path: Path, fmt: str
) -> None:
    """A norm weight near 1.0 moved by 1e-5 (below fp16's step there) comes back as trained, not as base."""
    pipe = _fresh_pipe(tiny_models_dir)
    params = dict(pipe.unet.named_parameters())
    norm = next(n for n in params if n.startswith("up_blocks.") and ".norm" in n and n.endswith(".weight"))
    conv = next(n for n in params if n.startswith("up_blocks.") and n.endswith("conv1.weight"))
    trained = {norm: params[norm].detach() + 1e-5, conv: params[conv].detach() + 0.1}
    assert torch.equal(trained[norm].half(), params[norm].detach().half())  # fp16 alone would lose it
    weights = tmp_path / "run.safetensors"
    names = list(trained)
    metadata = weights_metadata(_config(), "tiny", names, subject="robot", phrase="toy robot", run_id="3")
    save_trained_weights(weights, trained, metadata)
    target = tmp_path / ("robot-pipeline" if fmt == "diffusers" else "robot.safetensors")
    result = ex.export_run(pipe, weights, fmt, target, save_dtype="fp16")
    assert result.kept_fp32 == 1 and json.loads(result.metadata["kept_fp32"]) == [norm]
    if fmt == "diffusers":
        tensors = load_file(str(target / "unet" / "diffusion_pytorch_model.safetensors"))
        got_norm, got_conv = tensors[norm], tensors[conv]
    else:
        names = ex.original_layout_names(_fresh_pipe(tiny_models_dir))["unet"]
        tensors = load_file(str(target))
        got_norm, got_conv = tensors[names[norm][0]], tensors[names[conv][0]]
    assert got_norm.dtype == torch.float32 and torch.equal(got_norm, trained[norm])
    assert got_conv.dtype == torch.float16  # the rest keeps the smaller dtype


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_a_scaled_run_moves_the_base_by_that_share_of_its_update(tiny_models_dir, runs, kind) -> None:
    """`strength` 0 is the base model, 1 the run as trained, 0.5 halfway (a LoRA's scale, a full blend)."""
    base = {k: v.clone() for k, v in _fresh_pipe(tiny_models_dir).unet.state_dict().items()}
    states = {}
    for strength in (0.0, 0.5, 1.0):
        unet = _fresh_pipe(tiny_models_dir).unet
        load_trained_weights(unet, runs[kind], strength=strength)
        states[strength] = unet.state_dict()
    changed = [k for k in base if not torch.equal(states[1.0][k], base[k])]
    assert changed
    for key in changed:
        torch.testing.assert_close(states[0.0][key], base[key])
        torch.testing.assert_close(states[0.5][key], (base[key] + states[1.0][key]) / 2, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_gens_subject_model_takes_the_lora_scale_for_either_kind_of_run(tiny_models_dir, runs, kind) -> None:
    """`gen --lora-scale 0` renders with the base UNet, 1 with the run as trained (a full run too, although
    at scale 1 its tensors are loaded into place)."""
    from types import SimpleNamespace

    from stencil_cli.verbs.generate import subject_pipeline

    base = _fresh_pipe(tiny_models_dir).unet.state_dict()
    run = SimpleNamespace(weights_file=runs[kind])
    states = {}
    for scale in (0.0, 1.0):
        with subject_pipeline(str(tiny_models_dir / "subject"), run, device="cpu", precision="fp32",
                              lora_scale=scale) as pipe:  # fmt: skip
            states[scale] = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    assert all(torch.equal(states[0.0][k], base[k]) for k in base)
    assert any(not torch.equal(states[1.0][k], base[k]) for k in base)
