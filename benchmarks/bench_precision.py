"""Does the trained update survive save -> load -> inference dtype? Full-size SD1.5 decoder, random weights.

    python benchmarks/bench_precision.py                 # the full-size SD1.5 decoder (up_blocks), CPU
    python benchmarks/bench_precision.py --preset tiny   # the tiny preset's decoder
    python benchmarks/bench_precision.py --json

Only the UNet decoder (``up_blocks``, what `stencil train` trains) is materialised, from the shipped config
(``stencil_cli/models/configs/sd15.json``) with diffusers' default random initialisation. Each parameter gets
an
update of realistic size, in two shapes: "adam" (each element moved by ~1e-3, the size 100 Adam steps at lr
2e-5 give: 1e-3 * N(0, 1) clipped to +-2e-3) and "relative" (1/50 of the tensor's RMS weight, times N(0, 1)).
Each scenario saves the trained tensors in its file dtype (a real safetensors round trip, in memory), loads
them and casts to its inference dtype (half-precision rounding is exact on the CPU, so CUDA's dtypes are
emulated faithfully: storage rounding is the whole effect), then reports the fraction of updated elements
whose update survives (still moved, same direction) and the update's relative error ||got - u|| / ||u||.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stencil_cli.core.precision import DEFAULT_SAVE_DTYPE, subject_unet_dtype, update_fidelity  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# name -> (file format, inference dtype); "delta-fp16" stores (trained - base) in fp16, added to the base
SCENARIOS = {
    "before: fp16 file, bf16 UNet (old CUDA auto)": ("fp16", "bf16"),
    "before: fp16 file, fp32 UNet (old CPU)": ("fp16", "fp32"),
    "fp32 file, bf16 UNet": ("fp32", "bf16"),
    f"now: {DEFAULT_SAVE_DTYPE} file, CUDA auto UNet": (DEFAULT_SAVE_DTYPE, "cuda-auto"),
    f"now: {DEFAULT_SAVE_DTYPE} file, CPU auto UNet": (DEFAULT_SAVE_DTYPE, "cpu-auto"),
    "delta-fp16 file, fp32 UNet": ("delta-fp16", "fp32"),
}


def decoder(preset: str) -> dict[str, torch.Tensor]:
    """The decoder's parameters with random weights (the rest of the UNet is never materialised)."""
    if preset == "tiny":
        from stencil_cli.models import build_tiny_subject_pipeline

        unet = build_tiny_subject_pipeline().unet
        return {n: p.detach().float() for n, p in unet.named_parameters() if n.startswith("up_blocks.")}
    from stencil_cli.models import build_full_size_component

    unet = build_full_size_component("sd15", "unet", device="meta")
    up = unet.up_blocks.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for module in up.modules():
            if hasattr(module, "reset_parameters") and module is not up:
                module.reset_parameters()
    return {f"up_blocks.{n}": p.detach() for n, p in up.named_parameters()}


def update_for(weight: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """A realistic update for `weight` (see the module docstring)."""
    noise = torch.randn(weight.shape, generator=generator)
    if kind == "adam":
        return (noise * 1e-3).clamp(-2e-3, 2e-3)
    return noise * weight.pow(2).mean().sqrt().clamp_min(1e-6) / 50


def round_trip(base: torch.Tensor, trained: torch.Tensor, file: str, inference: torch.dtype) -> torch.Tensor:
    """trained -> safetensors bytes in `file` dtype -> loaded -> the inference dtype, back as float32."""
    from safetensors.torch import load, save

    if file == "delta-fp16":
        delta = load(save({"d": (trained - base).to(torch.float16).contiguous()}))["d"]
        weights = base + delta.float()
    else:
        weights = load(save({"w": trained.to(DTYPES[file]).contiguous()}))["w"]
    return weights.to(inference).float()


def inference_dtype(name: str) -> torch.dtype:
    if name == "cuda-auto":
        return subject_unet_dtype("auto", "cuda")
    if name == "cpu-auto":
        return subject_unet_dtype("auto", "cpu")
    return DTYPES[name]


def measure(params: dict[str, torch.Tensor], kind: str) -> dict[str, dict[str, float]]:
    generator = torch.Generator().manual_seed(1)
    totals = {name: [0, 0, 0.0, 0.0] for name in SCENARIOS}
    for base in params.values():
        trained = base + update_for(base, kind, generator)
        for name, (file, inference) in SCENARIOS.items():
            stored = round_trip(base, trained, file, inference_dtype(inference))
            for i, value in enumerate(update_fidelity(base, trained, stored)):
                totals[name][i] += value
    return {
        name: {"survive": s / max(1, m), "relative_error": (e / max(u, 1e-300)) ** 0.5}
        for name, (m, s, e, u) in totals.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["sd15", "tiny"], default="sd15")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    start = time.perf_counter()
    params = decoder(args.preset)
    count = sum(p.numel() for p in params.values())
    report = {
        "preset": args.preset,
        "decoder_parameters": count,
        "file_size_bytes": {"fp32": count * 4, "fp16": count * 2, "delta-fp16": count * 2},
        "updates": {kind: measure(params, kind) for kind in ("adam", "relative")},
        "cuda_auto_dtype": str(subject_unet_dtype("auto", "cuda")).replace("torch.", ""),
        "seconds": round(time.perf_counter() - start, 1),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{args.preset} decoder: {count / 1e6:.1f} M parameters; fp32 file {count * 4 / 1e9:.2f} GB")
    for kind, rows in report["updates"].items():
        print(f"\nupdate: {kind}")
        print(f"{'scenario':48s} {'survive':>9s} {'rel. error':>11s}")
        for name, row in rows.items():
            print(f"{name:48s} {row['survive'] * 100:8.2f}% {row['relative_error']:11.4f}")


if __name__ == "__main__":
    main()
