#!/usr/bin/env bash
# Start producer ranks and torchrun trainer ranks with one config tree.
#
#   scripts/launch.sh                      # the embedded CPU demo (experiment=cpu_demo)
#   scripts/launch.sh --producers 8 --trainers 8 \
#       --producer-devices 0,1,2,3,4,5,6,7 --trainer-devices 8,9,10,11,12,13,14,15 \
#       experiment=paper_cc3m data.path=/data/cc3m/{00000..00331}.tar
#
# Options (everything else is a Hydra override passed to every role):
#   --producers N            producer ranks on this node (default 1; 0 = real-only baseline, method=none;
#                            methods without a generator, none and real2x, start none)
#   --trainers N             trainer ranks on this node (torchrun --nproc-per-node; default 1)
#   --producer-devices LIST  CUDA devices for producers, one per rank, round-robin (default: none = CPU)
#   --trainer-devices LIST   CUDA_VISIBLE_DEVICES for the trainers (default: none = CPU)
#   --nnodes N --node-rank R --rdzv-endpoint HOST:PORT   multi-node torchrun rendezvous
#   --base-port P            first producer port; producer i binds 127.0.0.1:P+i (default 5555)
#   --run-dir DIR            where logs, metrics, checkpoints and W&B runs go (default runs/<time>)
#
# Each node runs its own producers; its trainers connect to them over loopback.
# The job ends when the trainers end; a producer that exits is logged, and the trainers
# go on with real data. The script stops every child when it exits or is signalled.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

producers=1 trainers=1 producer_devices="" trainer_devices="" nnodes=1 node_rank=0
rdzv_endpoint="" base_port=5555 run_dir=""
overrides=()
while [ $# -gt 0 ]; do
  case "$1" in
    --producers) producers="$2"; shift 2 ;;
    --trainers) trainers="$2"; shift 2 ;;
    --producer-devices) producer_devices="$2"; shift 2 ;;
    --trainer-devices) trainer_devices="$2"; shift 2 ;;
    --nnodes) nnodes="$2"; shift 2 ;;
    --node-rank) node_rank="$2"; shift 2 ;;
    --rdzv-endpoint) rdzv_endpoint="$2"; shift 2 ;;
    --base-port) base_port="$2"; shift 2 ;;
    --run-dir) run_dir="$2"; shift 2 ;;
    run_dir=*) run_dir="${1#run_dir=}"; shift ;;  # same as --run-dir
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    --*) echo "launch.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) overrides+=("$1"); shift ;;
  esac
done
for n in "$producers" "$trainers" "$nnodes" "$node_rank" "$base_port"; do
  [[ "$n" =~ ^[0-9]+$ ]] || { echo "launch.sh: expected a number, got '$n'" >&2; exit 2; }
done
[ "$trainers" -ge 1 ] || { echo "launch.sh: --trainers must be >= 1" >&2; exit 2; }

source scripts/env.sh

# The embedded default: with no Hydra overrides, the CPU demo (with overrides,
# name an experiment yourself, e.g. experiment=cpu_demo trainer.steps=50).
if [ ${#overrides[@]} -eq 0 ]; then
  overrides=(experiment=cpu_demo)
fi
run_dir="${run_dir:-runs/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$run_dir/logs"
run_dir="$(cd "$run_dir" && pwd)"

# --producers 0 is the real-only baseline (method=none) unless a method is named.
named_method=0
for o in "${overrides[@]}"; do [[ "$o" == method=* ]] && named_method=1; done
if [ "$producers" -eq 0 ] && [ "$named_method" -eq 0 ]; then
  overrides=("method=none" "${overrides[@]}")
fi
# A method that generates nothing (method=none, method=real2x) starts no producer.
if [ "$producers" -gt 0 ] && [ "$(python -m producers.plan "${overrides[@]}" | tail -1)" = "no" ]; then
  echo "launch.sh: the method uses no generator; starting no producer" >&2
  producers=0
fi

# Launch-wired values first, the user's overrides after them, so an explicit
# stream.endpoints (cross-host producers) wins.
common=("run_dir=$run_dir")
if [ "$producers" -gt 0 ]; then
  endpoints=""
  for ((i = 0; i < producers; i++)); do
    endpoints+="${endpoints:+,}'tcp://127.0.0.1:$((base_port + i))'"
  done
  common+=("stream.endpoints=[$endpoints]")
fi
common+=("${overrides[@]}")

pids=()
# A trainer rank sent SIGTERM finishes its step and writes a checkpoint before it exits;
# give it this long before SIGKILL (torchrun itself waits 30 s for its workers).
stop_grace_s="${EDSAM_STOP_GRACE_S:-60}"
cleanup() {
  trap - EXIT INT TERM
  # Every rank runs in its own session (setsid): signal the whole group, so
  # torchrun's workers and a producer's children go too.
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for ((tick = 0; tick < 2 * stop_grace_s; tick++)); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 -- "-$pid" 2>/dev/null && alive=1; done
    [ "$alive" -eq 0 ] && break
    sleep 0.5
  done
  for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'echo "launch.sh: signal received, stopping every rank" >&2; exit 130' INT TERM

# A producer whose generator must be trained first (model=retrained) trains it
# here, once, so trainers do not start against an empty stream.
[ "$producers" -eq 0 ] || python -m producers.prepare "${common[@]}"

IFS=',' read -r -a pdevs <<< "$producer_devices"
producer_pids=()
global_producers=$((producers * nnodes))
for ((i = 0; i < producers; i++)); do
  rank=$((node_rank * producers + i))
  dev=""
  [ ${#pdevs[@]} -gt 0 ] && dev="${pdevs[$((i % ${#pdevs[@]}))]}"
  extra=()
  [ -n "$dev" ] && extra+=("diffusion.device=cuda")
  CUDA_VISIBLE_DEVICES="$dev" setsid python -m producers "${common[@]}" "${extra[@]}" \
      "producer.rank=$rank" "producer.num_producers=$global_producers" "producer.endpoint_index=$i" \
      > "$run_dir/logs/producer$rank.log" 2>&1 &
  pids+=($!)
  producer_pids+=($!)
  echo "producer $rank: pid $! device ${dev:-cpu} -> $run_dir/logs/producer$rank.log"
done

torchrun_args=(--nproc-per-node "$trainers" --nnodes "$nnodes" --node-rank "$node_rank")
if [ -n "$rdzv_endpoint" ]; then
  torchrun_args+=(--rdzv-backend c10d --rdzv-endpoint "$rdzv_endpoint")
else
  torchrun_args+=(--standalone)
fi
trainer_extra=()
[ -n "$trainer_devices" ] && trainer_extra+=("runtime.device=cuda")
echo "trainers: torchrun ${torchrun_args[*]} -> $run_dir/logs/trainer.log"
CUDA_VISIBLE_DEVICES="$trainer_devices" setsid torchrun "${torchrun_args[@]}" -m consumers.train \
    "${common[@]}" "${trainer_extra[@]}" > >(tee "$run_dir/logs/trainer.log") 2>&1 &
trainer_pid=$!
pids+=("$trainer_pid")

# The job ends when the trainers do (their exit status is the job's; a failed rank
# makes torchrun stop the others). A producer that exits is logged and left alone:
# the trainers go on with the real-data fallback, counted in train/steps_without_syn
# and train/syn_fallback_samples.
status=0
running=("${producer_pids[@]}")
while kill -0 "$trainer_pid" 2>/dev/null; do
  still=()
  for pid in "${running[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      still+=("$pid")
    else
      pstatus=0
      wait "$pid" || pstatus=$?
      echo "launch.sh: producer pid $pid exited (status $pstatus); the trainers go on without it" >&2
    fi
  done
  running=("${still[@]}")
  sleep 1
done
wait "$trainer_pid" || status=$?

echo
echo "run folder:  $run_dir"
echo "logs:        $run_dir/logs/"
echo "metrics:     $run_dir/metrics/*.jsonl   (buffer-monitor --run-dir $run_dir)"
if compgen -G "$run_dir/wandb/offline-run-*" > /dev/null; then
  echo "W&B:         $(ls -dt "$run_dir"/wandb/offline-run-* | head -1)   (upload: wandb sync $run_dir/wandb/offline-run-*)"
fi
exit "$status"
