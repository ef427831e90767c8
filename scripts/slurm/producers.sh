#!/usr/bin/env bash
# One producer node's producers, one per GPU: what edsam.sbatch runs with srun on each producer node.
#
#   producers.sh PER_NODE NUM_PRODUCERS BASE_PORT RUN_DIR KEY_DIR [HYDRA OVERRIDES...]
#
# Producer i of node SLURM_NODEID is rank SLURM_NODEID * PER_NODE + i on GPU i, binds
# tcp://*:BASE_PORT+i and logs to RUN_DIR/logs/producer<rank>.log. KEY_DIR ("" = no CURVE)
# holds gen_curve_keys.py's producer-<rank> pairs. It returns when all of them have exited.
set -euo pipefail
per_node="$1" num_producers="$2" base_port="$3" run_dir="$4" keys="$5"
shift 5
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT TERM
for ((i = 0; i < per_node; i++)); do
  rank=$((SLURM_NODEID * per_node + i))
  key=()
  [ -z "$keys" ] || key=("stream.curve_client_secret=$keys/producers/producer-$rank.key_secret")
  CUDA_VISIBLE_DEVICES=$i python -m producers "$@" diffusion.device=cuda "stream.endpoints=['tcp://*:$((base_port + i))']" \
    producer.endpoint_index=0 "producer.rank=$rank" "producer.num_producers=$num_producers" "${key[@]}" \
    > "$run_dir/logs/producer$rank.log" 2>&1 &
  pids+=($!)
done
wait
