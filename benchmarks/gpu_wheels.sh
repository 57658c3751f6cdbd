#!/usr/bin/env bash
# Wheels for benchmarks/gpu.sh, fetched where PyPI is reachable, for a GPU machine that has no network.
#
#   bash benchmarks/gpu_wheels.sh [DIR]      # default DIR: benchmarks/.wheels (ignored by git)
#
# The GPU image (see docs/performance.md) has torch, transformers, accelerate, peft, safetensors, numpy, pillow,
# typer, rich, httpx and the rest, but not diffusers, sqlite-utils, platformdirs or openai. This downloads
# those four with their dependencies as wheels for CPython 3.12 on x86-64 Linux, then drops the wheels of
# packages the image already has (the list below), so that what travels stays small.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-benchmarks/.wheels}
PYTHON=${PYTHON:-python3}
mkdir -p "$DIR"
"$PYTHON" -m pip download --quiet --dest "$DIR" --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any \
  diffusers sqlite-utils platformdirs openai
# already on the GPU image (its package list, 2026-11-17): keep its builds
PRESENT="anyio certifi charset_normalizer click filelock fsspec h11 hf_xet httpcore httpx huggingface_hub idna
jinja2 markupsafe numpy packaging pillow pluggy python_dateutil pyyaml regex requests
safetensors six tabulate tqdm typing_extensions urllib3 zipp"
for name in $PRESENT; do
  rm -f "$DIR"/"$name"-*.whl "$DIR"/"$(echo "$name" | tr _ -)"-*.whl
done
ls -1 "$DIR"
du -sh "$DIR"
