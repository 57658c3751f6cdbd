"""Load stencil's exports with the real loaders of ComfyUI and the AUTOMATIC1111 Lora extension.

    python benchmarks/interop.py --comfyui /tmp/interop/comfyui --a1111 /tmp/interop/a1111
    flock /work/tools/fullsize.lock python benchmarks/interop.py --comfyui ... --a1111 ... \\
        --model /work/fullsize/sd15

ComfyUI (GPL-3.0) and AUTOMATIC1111 (AGPL-3.0) are not part of stencil (MIT) and none of their code is copied
here: each is imported from the local checkout given by path. Their heavy imports that the SD1.5 path never
uses (torchvision, torchaudio, gradio, A1111's `modules` package) are replaced by empty stub modules in
`sys.modules`, in this process only; their files are never edited.

For each run (a full-decoder run and a LoRA run, trained a few steps by stencil's own training loop on
synthetic data) and each export format, the script counts the keys the tool loads and drops, and the largest
difference between a weight the tool patched or loaded and the weight the export stands for: the trained
weight (full-rank formats, a LoRA run's LoRA) or the base plus the file's own low-rank update (a LoRA
extracted by SVD from a full run, whose approximation error the export reports separately). Names are
matched through ComfyUI's own diffusers -> original map (`comfy.utils.unet_to_diffusers`), not stencil's.

Without `--model` the base is the tiny preset with its UNet replaced by a small UNet of SD1.5's topology
(4 blocks, 2 layers per block, the same block types; A1111's key converter is hard-wired to that topology).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.abc
import importlib.machinery
import json
import logging
import subprocess
import sys
import tempfile
import types
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stencil_cli.core import export as export_core  # noqa: E402
from stencil_cli.core.training import TrainConfig, TrainingData, train_unet  # noqa: E402
from stencil_cli.core.weights import (  # noqa: E402
    lora_pairs,
    lora_scale,
    read_tensors,
    read_weights_metadata,
    save_trained_weights,
    trained_state,
    weights_kind,
    weights_metadata,
)

FORMATS = ("lora", "kohya", "single-file", "diffusers")


@dataclass
class Check:
    """One export loaded by one tool: what it took, what it dropped, how far from the run's weights."""

    tool: str
    commit: str
    run: str  # "full" or "lora"
    format: str
    keys: int  # keys in the file (LoRA) or UNet tensors in the checkpoint
    loaded: int
    dropped: int
    layers: int  # weights the tool patched or loaded
    max_diff: float  # the largest |tool weight - expected weight| over those weights
    note: str = ""

    @property
    def ok(self) -> bool:
        """Whether the tool took every key and gives back the expected weights (fp32 rounding aside)."""
        return self.dropped == 0 and self.loaded > 0 and self.max_diff < 1e-4


# -- stubs for the peers' imports the SD1.5 path never runs --


class _StubModule(types.ModuleType):
    """An empty package: unknown attributes are placeholder classes (Capitalised) or callable submodules."""

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        value: Any = (
            type(attr, (), {}) if attr[:1].isupper() else importlib.import_module(f"{self.__name__}.{attr}")
        )
        setattr(self, attr, value)
        return value

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answer imports of the named top-level packages (and their submodules) with `_StubModule`s."""

    def __init__(self, roots: set[str]) -> None:
        self.roots = roots

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        """A spec for the stubbed packages and their submodules; None for everything else."""
        if name.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        """An empty stub package."""
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to run."""


def git_commit(folder: Path) -> str:
    """The checkout's commit: a COMMIT file in it, else `git rev-parse`, else '?'."""
    marker = Path(folder) / "COMMIT"
    if marker.is_file():
        return marker.read_text().strip()
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, check=True)
        return out.stdout.decode().strip()
    return "?"


def import_comfyui(folder: Path) -> types.SimpleNamespace:
    """ComfyUI's `comfy` package from a checkout, on the CPU, torchvision/torchaudio stubbed."""
    import diffusers.pipelines  # noqa: F401 - transformers/diffusers must see the real world first

    sys.meta_path.insert(0, _StubFinder({"torchvision", "torchaudio"}))
    sys.path.insert(0, str(folder))
    argv, sys.argv = sys.argv, [sys.argv[0], "--cpu"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.lora
        import comfy.lora_convert
        import comfy.model_detection
        import comfy.sd
        import comfy.supported_models
        import comfy.utils
    finally:
        sys.argv = argv
    return types.SimpleNamespace(comfy=comfy, commit=git_commit(folder))


def import_a1111(folder: Path) -> types.SimpleNamespace:
    """The A1111 Lora extension's `networks` module from a checkout, its web-UI imports stubbed."""
    sys.meta_path.insert(0, _StubFinder({"gradio", "modules"}))
    sys.path.insert(0, str(Path(folder) / "extensions-builtin" / "Lora"))
    from modules import devices, shared

    devices.cpu = devices.device = torch.device("cpu")
    devices.dtype = torch.float32
    shared.opts = types.SimpleNamespace(lora_bundled_ti_to_infotext=False, lora_preferred_name="Filename")
    lora_dir = tempfile.mkdtemp(prefix="a1111-lora-")
    shared.cmd_opts = types.SimpleNamespace(lora_dir=lora_dir, lyco_dir_backcompat=lora_dir)
    shared.walk_files = lambda *args, **kwargs: iter(())  # no Lora folder to scan at import
    import networks

    return types.SimpleNamespace(networks=networks, shared=shared, commit=git_commit(folder))


# -- the base model and two runs --


def small_sd15_unet(cross_attention_dim: int) -> Any:
    """A UNet of SD1.5's topology (block types, 2 layers per block, 4 blocks) with small widths."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        norm_num_groups=8,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )


def load_base(model: str | None, work: Path) -> Any:
    """The base pipeline (fp32, CPU): a model folder, or the tiny preset with a small SD1.5-topology UNet."""
    from stencil_cli.models import ensure_tiny, load_subject_pipeline

    if model:
        return load_subject_pipeline(model, device="cpu", precision="fp32")
    pipe = load_subject_pipeline(str(ensure_tiny(work / "tiny") / "subject"), device="cpu", precision="fp32")
    pipe.unet = small_sd15_unet(pipe.text_encoder.config.hidden_size)
    return pipe


def train_runs(pipe: Any, work: Path, *, resolution: int, steps: int) -> dict[str, Path]:
    """A full-decoder run and a rank-4 LoRA run on synthetic latents: {kind: weights file}."""
    side = resolution // 8
    generator = torch.Generator().manual_seed(0)
    width = pipe.text_encoder.config.hidden_size
    data = TrainingData(
        torch.randn(2, 4, side, side, generator=generator),
        torch.randn(2, 77, width, generator=generator),
        (torch.rand(2, 1, side, side, generator=generator) > 0.3).float(),
        None,
    )
    runs = {}
    for kind, extra in (("full", {}), ("lora", {"lora_rank": 4, "lora_alpha": 8.0})):
        config = TrainConfig(
            steps=steps, batch_size=1, lr=1e-3, resolution=resolution, save_dtype="fp32", **extra
        )
        unet = copy.deepcopy(pipe.unet)
        result = train_unet(unet, pipe.scheduler, data, config)
        path = work / f"{kind}.safetensors"
        metadata = weights_metadata(
            config, "base", result.names, subject="robot", phrase="toy robot", run_id="1"
        )
        save_trained_weights(path, trained_state(unet, result.names, torch.float32), metadata)
        del unet, result
        gc.collect()
        runs[kind] = path
    return runs


def trained_weights(base_unet: Any, run_file: Path) -> dict[str, torch.Tensor]:
    """{diffusers name: weight} of every tensor the run changes, read from the run's own file (not from an
    export): a full run's tensors, or a LoRA run's base weights plus alpha / rank * B @ A."""
    metadata = read_weights_metadata(run_file)
    tensors = read_tensors(run_file)
    if weights_kind(metadata) != "lora":
        return tensors
    params = dict(base_unet.named_parameters())
    scale = lora_scale(metadata)
    out = {}
    for module, (down, up) in lora_pairs(tensors).items():
        weight = params[f"{module}.weight"].detach()
        out[f"{module}.weight"] = weight + scale * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
    return out


def write_exports(pipe: Any, run_file: Path, folder: Path, *, rank: int | None) -> dict[str, Path]:
    """Every export of one run, fp32 (so that a difference is the loader's, not the dtype's); `pipe` is
    given back with its base weights."""
    folder.mkdir(parents=True, exist_ok=True)
    params = dict(pipe.unet.named_parameters())
    changed = trained_weights(pipe.unet, run_file)
    base = {name: params[name].detach().clone() for name in changed}  # the full formats load the run
    out = {}
    for fmt in FORMATS:
        target = folder / (fmt if fmt == "diffusers" else f"{fmt}.safetensors")
        lora = fmt in ("lora", "kohya")
        export_core.export_run(pipe, run_file, fmt, target, rank=rank if lora else None, save_dtype="fp32")
        with torch.no_grad():
            for name, tensor in base.items():
                params[name].copy_(tensor)
        out[fmt] = target
    return out


def expected_lora_weights(base_unet: Any, peft_file: Path) -> dict[str, torch.Tensor]:
    """{diffusers weight name: base + B @ A} for each layer of a peft LoRA file (scale folded in)."""
    tensors = read_tensors(peft_file)
    params = dict(base_unet.named_parameters())
    expected = {}
    for key, down in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len("unet.") : -len(".lora_A.weight")]
        up = tensors[key.replace("lora_A", "lora_B")]
        weight = params[f"{module}.weight"].detach()
        delta = (up.flatten(1).float() @ down.flatten(1).float()).reshape(weight.shape)
        expected[f"{module}.weight"] = weight + delta
    return expected


# -- ComfyUI --


@contextlib.contextmanager
def captured_warnings() -> Iterator[list[str]]:
    """The warning-level log lines emitted inside the block (ComfyUI's "lora key not loaded: ...")."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Collect(logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield lines
    finally:
        root.removeHandler(handler)


def comfy_model(peer: types.SimpleNamespace, checkpoint: Path) -> tuple[Any, list[str]]:
    """ComfyUI's model patcher for a single-file checkpoint, as Load Checkpoint builds it (+ its warnings).

    The small SD1.5-topology UNet is not recognised by ComfyUI's detection (it checks SD1.5's widths): it is
    built as ComfyUI's SD15 model class from the detected config, then loaded as Load Checkpoint does."""
    comfy = peer.comfy
    sd = comfy.utils.load_torch_file(str(checkpoint))
    with captured_warnings() as lines:
        out = comfy.sd.load_state_dict_guess_config(sd, output_vae=False, output_clip=False)
        if out is None or out[0] is None:
            sd = comfy.utils.load_torch_file(str(checkpoint))  # the failed guess consumed the dict
            unet_config = comfy.model_detection.detect_unet_config(sd, "model.diffusion_model.")
            config = comfy.supported_models.SD15(unet_config)
            config.set_inference_dtype(torch.float32, None)
            model = config.get_model(sd, "model.diffusion_model.")
            model.load_model_weights(sd, "model.diffusion_model.")
            patcher = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
        else:
            patcher = out[0]
    return patcher, lines


def diffusers_to_comfy(peer: types.SimpleNamespace, patcher: Any) -> dict[str, str]:
    """{diffusers UNet name: ComfyUI state-dict key}, from ComfyUI's own map."""
    mapping = peer.comfy.utils.unet_to_diffusers(patcher.model.model_config.unet_config)
    present = patcher.model.state_dict()
    return {d: f"diffusion_model.{c}" for d, c in mapping.items() if f"diffusion_model.{c}" in present}


def max_difference(
    actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], names: dict[str, str]
) -> float:
    """The largest |actual[names[n]] - expected[n]| over the expected weights `names` maps."""
    worst = 0.0
    for name, want in expected.items():
        got = actual[names[name]].float().reshape(want.shape)
        worst = max(worst, float((got - want.float()).abs().max()))
    return worst


def comfyui_checks(
    peer: types.SimpleNamespace,
    run: str,
    exports: dict[str, Path],
    trained: dict[str, torch.Tensor],
    expected_lora: dict[str, torch.Tensor],
    base: Any,
) -> list[Check]:
    """Load LoRA (both LoRA formats), Load Checkpoint (single-file) and the diffusers loader, in ComfyUI.

    `trained`: the run's changed tensors (the full formats must give them back); `base`: ComfyUI's model
    of the base checkpoint (patched and unpatched again)."""
    comfy = peer.comfy
    checks = []
    names = diffusers_to_comfy(peer, base)
    for fmt in ("lora", "kohya"):
        lora = comfy.utils.load_torch_file(str(exports[fmt]))
        with captured_warnings() as lines:
            patched, _ = comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0.0)
        dropped = [line for line in lines if line.startswith("lora key not loaded")]
        patched.patch_model()
        state = patched.model.state_dict()
        layers = len(patched.patches)
        wanted = {n: w for n, w in expected_lora.items() if names.get(n) in patched.patches}
        diff = max_difference(state, wanted, names) if wanted else float("nan")
        missing = len(expected_lora) - len(wanted)
        patched.unpatch_model()
        checks.append(
            Check(
                "ComfyUI",
                peer.commit,
                run,
                fmt,
                len(lora),
                len(lora) - len(dropped),
                len(dropped),
                layers,
                diff,
                f"{missing} of {len(expected_lora)} layers not patched" if missing else "",
            )
        )
    patcher, lines = comfy_model(peer, exports["single-file"])
    state = patcher.model.state_dict()
    del patcher
    unet_keys = [
        k
        for k in comfy.utils.load_torch_file(str(exports["single-file"]))
        if k.startswith("model.diffusion_model.")
    ]
    left = [line for line in lines if "missing" in line.lower() or "left over" in line.lower()]
    checks.append(
        Check(
            "ComfyUI",
            peer.commit,
            run,
            "single-file",
            len(unet_keys),
            len(unet_keys) - len(left),
            len(left),
            len(names),
            max_difference(state, trained, names),
            "; ".join(left)[:200],
        )
    )
    try:
        import comfy.diffusers_load

        with captured_warnings() as lines:
            model = comfy.diffusers_load.load_diffusers(
                str(exports["diffusers"]), output_vae=False, output_clip=False
            )[0]
        state = model.model.state_dict()
        del model
        checks.append(
            Check(
                "ComfyUI",
                peer.commit,
                run,
                "diffusers",
                len(trained),
                len(names),
                0,
                len(names),
                max_difference(state, trained, names),
            )
        )
    except Exception as error:  # ComfyUI recognises only known UNet configs in a diffusers folder
        checks.append(
            Check(
                "ComfyUI",
                peer.commit,
                run,
                "diffusers",
                len(trained),
                0,
                0,
                0,
                float("nan"),
                f"not loaded: {str(error).split(' of: ')[0]}"[:100],
            )
        )
    return checks


# -- AUTOMATIC1111 --


class _Layers(torch.nn.Module):
    """A flat module holding plain Linear/Conv2d layers under A1111's network names (dots as underscores)."""


def a1111_model(comfy_patcher: Any) -> Any:
    """An `sd_model` stand-in for the Lora extension: the original-layout UNet (taken from ComfyUI's model,
    whose `diffusion_model` has A1111's module names) as plain torch layers sharing its weights, and no
    text encoder."""
    layers = _Layers()
    for name, module in comfy_patcher.model.named_modules():
        if not name.startswith("diffusion_model."):
            continue
        if isinstance(module, torch.nn.Conv2d):
            plain: torch.nn.Module = torch.nn.Conv2d(
                module.in_channels,
                module.out_channels,
                module.kernel_size,
                module.stride,
                module.padding,
                bias=False,
                device="meta",
            )
        elif isinstance(module, torch.nn.Linear):
            plain = torch.nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
        else:
            continue
        plain.weight = torch.nn.Parameter(module.weight.detach(), requires_grad=False)  # shared, not copied
        layers.add_module(name.replace(".", "_"), plain)
    return types.SimpleNamespace(is_sdxl=False, cond_stage_model=torch.nn.Module(), model=layers)


def a1111_checks(
    peer: types.SimpleNamespace,
    run: str,
    exports: dict[str, Path],
    expected_lora: dict[str, torch.Tensor],
    base_patcher: Any,
    names: dict[str, str],
) -> list[Check]:
    """Load both LoRA formats with the extension's `load_network` and rebuild each patched weight."""
    networks = peer.networks
    checks = []
    sd_model = a1111_model(base_patcher)
    peer.shared.sd_model = sd_model
    networks.assign_network_names_to_compvis_modules(sd_model)
    by_network_name = {names[n][: -len(".weight")].replace(".", "_"): n for n in expected_lora}
    from safetensors.torch import load_file

    for fmt in ("lora", "kohya"):
        file = exports[fmt]
        networks.sd_models.read_state_dict = lambda filename, file=file: load_file(str(file))
        on_disk = types.SimpleNamespace(filename=str(file))
        with captured_warnings():
            net = networks.load_network(fmt, on_disk)
        keys = len(load_file(str(file)))
        loaded = sum(len(module_keys(m)) for m in net.modules.values())
        worst = 0.0
        for sd_key, module in net.modules.items():
            layer = sd_model.network_layer_mapping[sd_key]
            updown, _ = module.calc_updown(layer.weight.detach())
            patched = layer.weight.detach() + updown * module.multiplier() * module.calc_scale()
            want = expected_lora[by_network_name[sd_key]]
            worst = max(worst, float((patched.reshape(want.shape) - want).abs().max()))
        missing = len(expected_lora) - len(net.modules)
        checks.append(
            Check(
                "A1111 Lora",
                peer.commit,
                run,
                fmt,
                keys,
                loaded,
                keys - loaded,
                len(net.modules),
                worst if net.modules else float("nan"),
                f"{missing} of {len(expected_lora)} layers not patched" if missing else "",
            )
        )
    return checks


def module_keys(module: Any) -> list[str]:
    """The file keys one A1111 network module was built from (up, down, and alpha when present)."""
    keys = ["lora_up.weight", "lora_down.weight"]
    return keys + (["alpha"] if module.alpha is not None else [])


# -- the whole check --


def run_checks(
    comfyui: Path | None,
    a1111: Path | None,
    model: str | None,
    work: Path,
    *,
    resolution: int = 64,
    steps: int = 2,
) -> list[Check]:
    """Train two runs, export each in every format, load the exports in the given tools; one Check each."""
    if a1111 and not comfyui:
        raise SystemExit("the A1111 check takes its original-layout model from ComfyUI: give --comfyui too")
    pipe = load_base(model, work)
    runs = train_runs(pipe, work, resolution=resolution, steps=steps)
    base_file = work / "base.safetensors"
    save_trained_weights(base_file, export_core.original_layout_state(pipe, torch.float32), {})
    prepared = {}
    for run, run_file in runs.items():
        rank = None if run == "lora" else 8
        exports = write_exports(pipe, run_file, work / f"export-{run}", rank=rank)
        trained = trained_weights(pipe.unet, run_file)
        # a LoRA run's LoRA files must give back its trained weights; a full run's, the file's own update
        expected = trained if run == "lora" else expected_lora_weights(pipe.unet, exports["lora"])
        prepared[run] = (exports, trained, expected)
    del pipe  # the tools' own models take its place in memory
    gc.collect()
    checks: list[Check] = []
    if not comfyui:
        return checks
    comfy_peer = import_comfyui(comfyui)
    a1111_peer = import_a1111(a1111) if a1111 else None
    base, _ = comfy_model(comfy_peer, base_file)
    for run, (exports, trained, expected) in prepared.items():
        checks += comfyui_checks(comfy_peer, run, exports, trained, expected, base)
        if a1111_peer:
            checks += a1111_checks(
                a1111_peer, run, exports, expected, base, diffusers_to_comfy(comfy_peer, base)
            )
        gc.collect()
    return checks


def table(checks: list[Check]) -> str:
    """The results as a Markdown table."""
    lines = [
        "| tool | commit | run | format | keys | loaded | dropped | layers | max diff | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in checks:
        lines.append(
            f"| {c.tool} | `{c.commit[:10]}` | {c.run} | `{c.format}` | {c.keys} | {c.loaded} | "
            f"{c.dropped} | {c.layers} | {c.max_diff:.2e} | {c.note} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the checks and print the table (or JSON); exit 1 when an export fails a tool the docs name."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, help="a ComfyUI checkout")
    parser.add_argument("--a1111", type=Path, help="a stable-diffusion-webui checkout (its Lora extension)")
    parser.add_argument("--model", help="a full-size SD1.5 folder (default: the small SD1.5-topology model)")
    parser.add_argument(
        "--resolution", type=int, default=None, help="training resolution (64; 256 full size)"
    )
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    resolution = args.resolution or (256 if args.model else 64)
    with tempfile.TemporaryDirectory(prefix="stencil-interop-") as work:
        checks = run_checks(
            args.comfyui, args.a1111, args.model, Path(work), resolution=resolution, steps=args.steps
        )
    if args.json:
        print(json.dumps([asdict(c) | {"ok": c.ok} for c in checks], indent=2))
    else:
        print(table(checks))
    recommended = {("ComfyUI", "kohya"), ("ComfyUI", "single-file"), ("A1111 Lora", "kohya")}
    return 1 if any(not c.ok for c in checks if (c.tool, c.format) in recommended) else 0


if __name__ == "__main__":
    sys.exit(main())
