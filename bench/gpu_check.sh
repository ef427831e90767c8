#!/usr/bin/env bash
# The GPU check: one prepared script for a fresh copy of the repository on a GPU machine.
# It prints one table (step, status, seconds, result) and exits non-zero if any step failed;
# every step runs with its own timeout, so a hang names the step (bench/gpu_check.py).
#
#   bench/gpu_check.sh --device cpu --tiny            # here: the same steps with tiny models (in the test suite)
#   bench/gpu_check.sh --wheels .whl --out "$OUT"     # a GPU machine without network (CUDA torch preinstalled)
#
# --wheels DIR installs the wheels of bench/gpu_wheels.sh (the project's pinned dependencies
# but torch/torchvision, which the machine's CUDA build provides) for the machine's own
# `python3` into a fresh target folder, no network and no virtualenv (a carried venv's
# interpreter is a link to a Python the GPU machine may not have). Without --wheels it uses
# scripts/env.sh's .venv, as the README's commands do. Every other argument goes to
# bench/gpu_check.py (--device cuda|cpu, --tiny, --out DIR, --only STEP,..., --stream-seconds N).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
args=()
wheels=""
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
if [ -n "$wheels" ]; then
  python="$(command -v python3)"
  site="$(mktemp -d /tmp/edsam-site.XXXXXX)"
  echo "[gpu_check] installing $(ls "$wheels"/*.whl | wc -l) wheels from $wheels for $python into $site" >&2
  "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl
  export PYTHONPATH="$site:$root${PYTHONPATH:+:$PYTHONPATH}"
  export EDSAM_SYSTEM_PYTHON=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1
  # launch.sh and the steps call `python` and `torchrun`: give them the machine's python3
  bin="$site/.bin"
  mkdir -p "$bin"
  printf '#!/bin/sh\nexec %q "$@"\n' "$python" > "$bin/python"
  printf '#!/bin/sh\nexec %q -m torch.distributed.run "$@"\n' "$python" > "$bin/torchrun"
  chmod +x "$bin/python" "$bin/torchrun"
  export PATH="$bin:$PATH"
else
  source scripts/env.sh
  python=python
fi
exec "$python" bench/gpu_check.py run "${args[@]}"
