#!/usr/bin/env bash
# Download the wheels bench/gpu_check.sh --wheels installs on a GPU machine without network:
# pyproject.toml's pinned dependencies for that machine's Python (3.12 by default), but
# torch and torchvision (the machine's CUDA build is used) and wandb (the check logs to
# JSONL only), plus the pure-Python dependencies of those pins that such an image lacks.
#   bench/gpu_wheels.sh [DIR (default .whl)] [PYTHON_VERSION (default 3.12)]
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.whl}" pyver="${2:-3.12}"
mkdir -p "$dir"
mapfile -t pins < <(python3 - <<'PY'
import tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
skip = ("torch", "torchvision", "wandb")
for d in deps:
    name = d.split("==")[0].split(">=")[0].strip()
    if "==" in d and name not in skip:
        print(d.split("#")[0].strip())
PY
)
extra=(ftfy==6.3.1 wcwidth==0.9.4 braceexpand==0.1.7 importlib_metadata==10.2.0 omegaconf==2.3.1)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_26_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
  "${platforms[@]}" -d "$dir" "${pins[@]}" "${extra[@]}"
# antlr4-python3-runtime (Hydra's parser) is published as a source distribution only: build its wheel
python3 -m pip wheel -q --no-deps -w "$dir" antlr4-python3-runtime==4.9.3
ls "$dir"
