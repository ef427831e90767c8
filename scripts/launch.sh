#!/usr/bin/env bash
# Start producer ranks and torchrun trainer ranks with one config tree.
#
#   scripts/launch.sh                      # the embedded CPU demo (experiment=cpu_demo)
#   scripts/launch.sh trainer.steps=50     # the demo with an override (it adds to experiment=cpu_demo)
#   scripts/launch.sh --producers 8 --trainers 8 \
#       --producer-devices 0,1,2,3,4,5,6,7 --trainer-devices 8,9,10,11,12,13,14,15 \
#       experiment=paper_cc3m data.path='/data/cc3m/{00000..00331}.tar'
#
# Options (everything else is a Hydra override passed to every role, added to the embedded
# experiment=cpu_demo unless one names experiment=...; ~experiment is the bare base tree):
#   --producers N            producer ranks on this node (default 1; 0 = real-only baseline, method=none;
#                            methods without a generator, none and real2x, start none)
#   --trainers N             trainer ranks on this node (torchrun --nproc-per-node; default 1)
#   --producer-devices LIST  CUDA devices for producers, one per rank, round-robin (default: none = CPU)
#   --trainer-devices LIST   CUDA_VISIBLE_DEVICES for the trainers (default: none = CPU)
#   --nnodes N --node-rank R --rdzv-endpoint HOST:PORT   multi-node torchrun rendezvous
#   --base-port P            first producer port; producer i binds 127.0.0.1:P+i (default 5555)
#   --run-dir DIR            where logs, metrics, checkpoints and W&B runs go (default runs/<time>)
#   --producer-restarts N    restarts of a producer that exits abnormally, 1 s backoff doubling to 30 s (default 5)
#   --curve-keys DIR         CURVE on the stream with the keys of scripts/gen_curve_keys.py DIR: producer r
#                            uses DIR/producers/producer-<r>.key_secret, trainers accept DIR/allowed/*.key
#   --dry-run                check the config, print every command it would start, start none
#   --cfg job|hydra|all      print the composed config (Hydra's --cfg), start none
#
# The config of every role is checked first (python -m edsam_online.preflight): a wrong key,
# value or path exits 2 naming the key, before a run folder or a process exists.
# Each node runs its own producers; its trainers connect to them over loopback.
# The job ends when the trainers end. A producer that exits abnormally is restarted (a new
# session of the same rank); past the cap the trainers go on with real data. A failed
# trainer rank stops everything, and the script prints the command that resumes the run
# from its last checkpoint, when it left one.
# SIGTERM or Ctrl-C (to this script, or to every process of the job, as SLURM's scancel and
# preemption send it): every trainer rank finishes its step and checkpoints at the same step,
# the producers stop, and the script exits 0 printing the command that resumes the run;
# a second Ctrl-C stops everything at once. EDSAM_STOP_GRACE_S (default 60) bounds the
# wait for that checkpoint before ranks are killed. The script stops every child when it exits.
set -euo pipefail
launch_args=("$@")
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

producers=1 trainers=1 producer_devices="" trainer_devices="" nnodes=1 node_rank=0
rdzv_endpoint="" base_port=5555 run_dir="" dry_run=0 producer_restarts=5 curve_keys="" print_cfg=""
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
    --dry-run) dry_run=1; shift ;;
    --producer-restarts) producer_restarts="$2"; shift 2 ;;
    --curve-keys) curve_keys="$2"; shift 2 ;;
    --cfg) print_cfg="$2"; shift 2 ;;
    run_dir=*) run_dir="${1#run_dir=}"; shift ;;  # same as --run-dir
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    --*) echo "launch.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) overrides+=("$1"); shift ;;
  esac
done
for n in "$producers" "$trainers" "$nnodes" "$node_rank" "$base_port" "$producer_restarts"; do
  [[ "$n" =~ ^[0-9]+$ ]] || { echo "launch.sh: expected a number, got '$n'" >&2; exit 2; }
done
[ "$trainers" -ge 1 ] || { echo "launch.sh: --trainers must be >= 1" >&2; exit 2; }

source scripts/env.sh

# The embedded default: overrides add to the CPU demo unless they name an experiment.
experiment=""
for o in "${overrides[@]}"; do
  [[ "$o" =~ ^\+{0,2}experiment= ]] && experiment="${o#*experiment=}"
  [[ "$o" =~ ^~experiment ]] && experiment="none (~experiment: the base tree)"
done
if [ -z "$experiment" ]; then
  experiment=cpu_demo
  overrides=(experiment=cpu_demo "${overrides[@]}")
  echo "launch.sh: experiment=cpu_demo (the embedded default; experiment=NAME runs another)" >&2
else
  echo "launch.sh: experiment=$experiment" >&2
fi
# --cfg job|hydra|all: the composed config, as Hydra prints it, and nothing started.
if [ -n "$print_cfg" ]; then
  exec python -m consumers.train "${overrides[@]}" --cfg "$print_cfg"
fi

# --producers 0 is the real-only baseline (method=none) unless a method is named.
named_method=0
for o in "${overrides[@]}"; do [[ "$o" == method=* ]] && named_method=1; done
if [ "$producers" -eq 0 ] && [ "$named_method" -eq 0 ]; then
  overrides=("method=none" "${overrides[@]}")
fi
# One validation pass before anything exists (edsam_online/preflight.py): every key, value
# and path of every role's config; a problem exits 2 with one line naming the key. Its last
# lines say whether the method generates (method=none, method=real2x start no producer) and
# whether its generator or scorer needs producers.prepare first (edsam_online.preflight.launch_plan).
plan="$(python -m edsam_online.preflight --plan "${overrides[@]}")" || exit 2
if [ "$producers" -gt 0 ] && grep -qx "producers no" <<< "$plan"; then
  echo "launch.sh: the method uses no generator; starting no producer" >&2
  producers=0
fi
prepare=0
[ "$producers" -gt 0 ] && grep -qx "prepare yes" <<< "$plan" && prepare=1

run_dir="${run_dir:-runs/$(date +%Y%m%d-%H%M%S)}"
if [ "$dry_run" -eq 1 ]; then
  run_dir="$(realpath -m "$run_dir")"
else
  mkdir -p "$run_dir/logs"
  run_dir="$(cd "$run_dir" && pwd)"
fi

# Requested CUDA devices must exist before anything starts.
if [ -n "$producer_devices$trainer_devices" ]; then
  ndev="$(python -c 'import torch; print(torch.cuda.device_count())')"
  IFS=',' read -r -a wanted <<< "$producer_devices,$trainer_devices"
  for d in "${wanted[@]}"; do
    [ -z "$d" ] && continue
    if ! [[ "$d" =~ ^[0-9]+$ ]] || [ "$d" -ge "$ndev" ]; then
      echo "launch.sh: CUDA device '$d' (--producer-devices / --trainer-devices) does not exist here: this machine has $ndev" >&2
      exit 2
    fi
  done
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
# --curve-keys: one key pair per producer rank, and the receivers' allow-list.
if [ -n "$curve_keys" ]; then
  curve_keys="$(realpath -m "$curve_keys")"
  needed=("$curve_keys/receiver.key_secret" "$curve_keys/receiver.key")
  for ((i = 0; i < producers; i++)); do
    needed+=("$curve_keys/producers/producer-$((node_rank * producers + i)).key_secret")
  done
  for f in "${needed[@]}"; do
    [ -f "$f" ] || { echo "launch.sh: --curve-keys: $f is missing (python scripts/gen_curve_keys.py $curve_keys --producers $((producers * nnodes)))" >&2; exit 2; }
  done
  common+=("stream.curve=true" "stream.curve_server_secret=$curve_keys/receiver.key_secret"
           "stream.curve_server_public=$curve_keys/receiver.key" "stream.curve_allow_dir=$curve_keys/allowed")
fi
common+=("${overrides[@]}")

IFS=',' read -r -a pdevs <<< "$producer_devices"
global_producers=$((producers * nnodes))
producer_cmd() {  # producer_cmd I: this node's producer I as cmd, its rank and device in rank, dev
  rank=$((node_rank * producers + $1))
  dev=""
  [ ${#pdevs[@]} -gt 0 ] && dev="${pdevs[$(($1 % ${#pdevs[@]}))]}"
  cmd=(python -m producers "${common[@]}")
  [ -n "$dev" ] && cmd+=("diffusion.device=cuda")
  cmd+=("producer.rank=$rank" "producer.num_producers=$global_producers" "producer.endpoint_index=$1")
  [ -z "$curve_keys" ] || cmd+=("stream.curve_client_secret=$curve_keys/producers/producer-$rank.key_secret")
}
torchrun_args=(--nproc-per-node "$trainers" --nnodes "$nnodes" --node-rank "$node_rank")
if [ -n "$rdzv_endpoint" ]; then
  torchrun_args+=(--rdzv-backend c10d --rdzv-endpoint "$rdzv_endpoint")
else
  torchrun_args+=(--standalone)
fi
# torchrun through consumers/torchrun.py: signalled itself, it ends without a traceback.
trainer_cmd=(python -m consumers.torchrun "${torchrun_args[@]}" -m consumers.train "${common[@]}")
[ -n "$trainer_devices" ] && trainer_cmd+=("runtime.device=cuda")

if [ "$dry_run" -eq 1 ]; then  # one line per command, quoted so it can be pasted into a shell
  show() { local line; printf -v line '%q ' "$@"; echo "${line% }"; }
  [ "$prepare" -eq 0 ] || show python -m producers.prepare "${common[@]}"
  for ((i = 0; i < producers; i++)); do
    producer_cmd "$i"
    show env CUDA_VISIBLE_DEVICES="$dev" "${cmd[@]}"
  done
  show env CUDA_VISIBLE_DEVICES="$trainer_devices" "${trainer_cmd[@]}"
  exit 0
fi

pids=() trainer_pid="" stopping="" checkpoint_at_stop=""
# A trainer rank sent SIGTERM finishes its step and writes a checkpoint before it exits;
# give it this long before SIGKILL. torchrun, when it is signalled itself (scancel signals
# every process), passes TERM on to its ranks and waits as long (TORCH_ELASTIC_SHUTDOWN_TIMEOUT).
stop_grace_s="${EDSAM_STOP_GRACE_S:-60}"
[[ "$stop_grace_s" =~ ^[0-9]+$ ]] || { echo "launch.sh: EDSAM_STOP_GRACE_S: expected a number, got '$stop_grace_s'" >&2; exit 2; }
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-$stop_grace_s}"
newest_checkpoint() { compgen -G "$run_dir/checkpoints/step_*.pt" | sort | tail -1 || true; }
trainer_ranks() {  # torchrun's workers, the trainer ranks: each leads its own session
  [ -z "$trainer_pid" ] || pgrep -P "$trainer_pid" || true
}
on_signal() {  # SIG$1: TERM goes to the trainer ranks themselves, once, and the loop below waits for them
  if [ -n "$stopping" ]; then
    [ "$1" = INT ] || return 0
    echo "launch.sh: second interrupt: stopping every rank now" >&2
    exit 130
  fi
  stopping="$1" checkpoint_at_stop="$(newest_checkpoint)" stop_deadline=$((SECONDS + stop_grace_s))
  if [ -z "$trainer_pid" ]; then
    echo "launch.sh: SIG$1 received before the trainers started: stopping every rank" >&2
    exit 130
  fi
  echo "launch.sh: SIG$1 received: the trainer ranks finish their step and write a checkpoint (up to $stop_grace_s s)" >&2
  # Signalled directly, the ranks exit 0 and torchrun with them; torchrun itself is signalled
  # only when its ranks have not started yet.
  local ranks
  ranks="$(trainer_ranks)"
  [ -n "$ranks" ] || ranks="$trainer_pid"
  for r in $ranks; do kill -TERM -- "-$r" 2>/dev/null || kill -TERM "$r" 2>/dev/null || true; done
}
cleanup() {
  trap - EXIT INT TERM
  # Every rank runs in its own session (setsid): signal the whole group, so
  # torchrun's workers and a producer's children go too.
  local ranks
  ranks="$(trainer_ranks)"
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for ((tick = 0; tick < 2 * stop_grace_s; tick++)); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 -- "-$pid" 2>/dev/null && alive=1; done
    [ "$alive" -eq 0 ] && break
    sleep 0.5
  done
  for pid in "${pids[@]}" $ranks; do kill -KILL -- "-$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM

# A producer whose generator must be trained or downloaded first (model=retrained, a hub id)
# gets it here, once, so trainers do not start against an empty stream.
[ "$prepare" -eq 0 ] || python -m producers.prepare "${common[@]}"

producer_pid=() restarts=() restart_at=()
start_producer() {  # start_producer I: start this node's producer I (a restart appends to its log)
  producer_cmd "$1"
  CUDA_VISIBLE_DEVICES="$dev" setsid "${cmd[@]}" >> "$run_dir/logs/producer$rank.log" 2>&1 &
  producer_pid[$1]=$!
  pids+=($!)
  echo "producer $rank: pid $! device ${dev:-cpu} -> $run_dir/logs/producer$rank.log"
}
for ((i = 0; i < producers; i++)); do
  restarts[$i]=0 restart_at[$i]=""
  start_producer "$i"
done

echo "trainers: torchrun ${torchrun_args[*]} -> $run_dir/logs/trainer.log"
# tee ignores INT and TERM: signalled with the job, it would close the ranks' output mid-checkpoint.
CUDA_VISIBLE_DEVICES="$trainer_devices" setsid "${trainer_cmd[@]}" > >(trap '' INT TERM; exec tee "$run_dir/logs/trainer.log") 2>&1 &
trainer_pid=$!
pids+=("$trainer_pid")

# The job ends when the trainers do (their exit status is the job's; a failed rank
# makes torchrun stop the others). A producer that exits with status 0 has made its
# producer.num_samples; one that fails is restarted after a backoff, at most
# --producer-restarts times, each restart counted in its log and in
# metrics/launch.jsonl (launch/producer_restarts). Meanwhile, and past the cap, the
# trainers go on with the real-data fallback (train/steps_without_extra, train/extra_fallback_samples).
status=0 restarts_total=0
mkdir -p "$run_dir/metrics"
while kill -0 "$trainer_pid" 2>/dev/null; do
  now=$(date +%s)
  for ((i = 0; i < producers; i++)); do
    rank=$((node_rank * producers + i))
    pid="${producer_pid[$i]}"
    if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
      pstatus=0
      wait "$pid" || pstatus=$?
      producer_pid[$i]=""
      if [ "$pstatus" -eq 0 ] || [ -n "$stopping" ]; then
        echo "launch.sh: producer $rank finished (status $pstatus)" >&2
      elif [ "${restarts[$i]}" -lt "$producer_restarts" ]; then
        restarts[$i]=$((restarts[$i] + 1))
        delay=$((1 << (restarts[$i] - 1)))
        [ "$delay" -gt 30 ] && delay=30
        restart_at[$i]=$((now + delay))
        echo "launch.sh: producer $rank exited (status $pstatus); restart ${restarts[$i]} of $producer_restarts in $delay s" \
          | tee -a "$run_dir/logs/producer$rank.log" >&2
      else
        echo "launch.sh: producer $rank exited (status $pstatus) after $producer_restarts restarts; the trainers go on without it" \
          | tee -a "$run_dir/logs/producer$rank.log" >&2
      fi
    fi
    if [ -n "${restart_at[$i]}" ] && [ -z "$stopping" ] && [ "$now" -ge "${restart_at[$i]}" ]; then
      restart_at[$i]=""
      start_producer "$i"
      restarts_total=$((restarts_total + 1))
      printf '{"step": %d, "time": %d, "role": "launch", "rank": %d, "launch/producer_restarts": %d, "launch/restarted_producer": %d}\n' \
        "$restarts_total" "$now" "$node_rank" "$restarts_total" "$rank" >> "$run_dir/metrics/launch.jsonl"
    fi
  done
  if [ -n "$stopping" ] && [ "$SECONDS" -ge "$stop_deadline" ]; then
    echo "launch.sh: the trainer ranks did not stop within $stop_grace_s s (EDSAM_STOP_GRACE_S): killing them" >&2
    for pid in $(trainer_ranks) "$trainer_pid"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
  fi
  sleep 1 & wait $! || true  # a signal ends the wait at once (and its trap runs)
done
wait "$trainer_pid" || status=$?
# The producers stop now, so their final counts complete the run's sample ledger.
cleanup
[ "$producers" -eq 0 ] || python -m edsam_online.ledger "$run_dir" || true
# Stopped by a signal: a checkpoint written since then means every rank stopped at its step
# (torchrun exits 1 when it was signalled itself, though its ranks ended cleanly).
newest="$(newest_checkpoint)" stopped_at=""
[ -z "$stopping" ] || [ "$newest" = "$checkpoint_at_stop" ] || stopped_at="$newest"
if [ -n "$stopped_at" ]; then
  echo "launch.sh: stopped by SIG$stopping; every trainer rank checkpointed at ${stopped_at##*/}" >&2
  status=0
elif [ -n "$stopping" ] && [ "$status" -ne 0 ]; then
  echo "launch.sh: stopped by SIG$stopping before the trainers wrote a checkpoint (status $status)" >&2
  status=130
elif [ "$status" -ne 0 ]; then
  echo "launch.sh: a trainer rank failed (status $status); every rank is stopped." >&2
fi
if [ -n "$newest" ] && { [ -n "$stopped_at" ] || [ "$status" -ne 0 ]; }; then
  resume_args=() skip=0  # the launch's own arguments, less its run folder and resume
  for a in "${launch_args[@]}"; do
    if [ "$skip" -eq 1 ]; then skip=0; continue; fi
    case "$a" in
      --run-dir) skip=1 ;;
      run_dir=*|checkpoint.resume=*|+checkpoint.resume=*|++checkpoint.resume=*) ;;
      *) resume_args+=("$a") ;;
    esac
  done
  printf -v resume '%q ' scripts/launch.sh "${resume_args[@]}" --run-dir "$run_dir" checkpoint.resume=latest
  echo "launch.sh: continue the run from its last checkpoint with:" >&2
  echo "  ${resume% }" >&2
fi

echo
echo "run folder:  $run_dir"
echo "logs:        $run_dir/logs/"
echo "metrics:     $run_dir/metrics/*.jsonl   (buffer-monitor --run-dir $run_dir)"
if compgen -G "$run_dir/wandb/offline-run-*" > /dev/null; then
  echo "W&B:         $(ls -dt "$run_dir"/wandb/offline-run-* | head -1)   (upload: wandb sync $run_dir/wandb/offline-run-*)"
fi
exit "$status"
