#!/usr/bin/env bash
# Reproduce every row of BENCHMARKS.md's performance summary on this machine, then print
# target, measured and PASS/MISS for each (bench/targets.py), with the profile behind a MISS.
# About 1 h 45 min on the 2-core development machine; run it with nothing else running.
#
#   bench/run_all.sh [--out DIR] [--gpu DIR]
#     --out DIR   where each benchmark's JSON and log go (default runs/bench-<time>)
#     --gpu DIR   the --out folder of `bench/gpu_check.sh` from a GPU machine: its table joins
#                 the summary and its bf16 sampler / trainer rates feed the sizing
set -euo pipefail
cd "$(dirname "$0")/.."
out="runs/bench-$(date +%Y%m%d-%H%M%S)" gpu=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --gpu) gpu="$2"; shift 2 ;;
    *) echo "run_all.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
source scripts/env.sh
mkdir -p "$out"
step() {  # step NAME CMD...: run CMD, its output to $out/NAME.log
  local name="$1"; shift
  echo "[run_all] $name: $*" >&2
  "$@" > "$out/$name.log" 2>&1 || { echo "[run_all] $name failed, see $out/$name.log" >&2; return 1; }
}
step online_offline python bench/bench_online_offline.py --reps 3 --json "$out/online_offline.json"
step producer python bench/bench_producer.py --json "$out/producer.json"
step vs_pipeline python bench/bench_generator.py vs-pipeline --json "$out/vs_pipeline.json"
step components python bench/bench_generator.py components --json "$out/components.json"
for i in 1 2 3; do
  step "memory_$i" python bench/bench_memory.py --minutes 10 --json "$out/memory_$i.json"
done
step gpu_check_tiny bash bench/gpu_check.sh --device cpu --tiny --out "$out/gpu_check_tiny"
sizing=()
if [ -n "$gpu" ]; then
  cp -r "$gpu" "$out/gpu_check_gpu"
  mapfile -t sizing < <(python - "$out/gpu_check_gpu/gpu_check.json" <<'PY'
import json, sys
rows = {r["step"]: r["result"] for r in json.load(open(sys.argv[1]))}
bf16 = {v["variant"]: v["samples_per_s"] for v in rows.get("sampler", {}).get("rows", [])}.get("bf16")
mix = {m["mode"]: m["samples_per_s"] for m in rows.get("trainer", {}).get("modes", [])}.get("mix")
if bf16: print("--gen-samples-per-s"); print(bf16)
if mix: print("--train-samples-per-s"); print(mix)
PY
)
fi
step sizing python bench/paper_sizing.py "${sizing[@]}" --json "$out/sizing.json"
python bench/targets.py "$out" | tee "$out/targets.md"
