"""The soak: the CPU demo with 2 producers and 2 trainer ranks for ``--minutes`` under faults.

    python bench/soak.py --minutes 60 [--out DIR] [--kill-every-s 240] [--seed 0]
    python bench/soak.py --check DIR     # the checks again, on a soak already run

Faults, all through ``scripts/launch.sh`` as a user's cluster would cause them:

* a producer rank killed with ``kill -9`` at random every ``--kill-every-s`` seconds (± half);
  launch.sh restarts it as a new session of its rank;
* at half time, SIGTERM to every process of the job (what SLURM's ``scancel`` and preemption
  send); the job must exit 0 with a checkpoint, and the soak resumes it with
  ``checkpoint.resume=latest`` (``checkpoint.buffer=true``: the buffers come back warm);
* a stray peer throughout: it binds a socket the trainers also connect to and sends hostile
  messages (garbage, non-msgpack, wrong types) every ``--hostile-every-s`` seconds.

Two cores cannot generate what two trainer ranks draw, so the soak turns the rate limiter off
(``buffer.samples_per_insert=0``): once a buffer holds ``min_size_to_sample`` items every draw
is served, and a step lacks generated samples only where the pipeline failed it (an empty buffer
after a resume, a starved receiver), which is what the soak is after.

At the end the job gets a last SIGTERM (a clean stop) and the soak checks, prints, and exits 1
if any fails:

1. every step trained: each step from 1 to the last is logged once per process lifetime, the
   resumed trainer continuing at its checkpoint's step;
2. at least 95% of the steps after ``--warmup-steps`` had their full synthetic slot (no real
   fallback in the step), and so did the 95% of the ``--after-resume`` steps right after the resume;
3. each trainer rank's RSS grows by at most 5% from the moment its buffer first fills to its end,
   counted from ``--warmup-steps`` into each process (:func:`rss_baselines` says why);
4. no ``Traceback`` in any log;
5. the ledger (:mod:`edsam_online.ledger`): every producer process that ended cleanly balances
   ``generated = filtered + sent + unsent`` exactly; samples ``sent`` against those the trainers
   counted (accepted, dropped by reason, in flight) differ by no more than what ``kill -9``
   makes unknowable: the samples a killed producer generated after its last record
   (``producer.log_every_s=1``) and those its socket still held. The stray peer's messages carry
   no sample count and show as ``dropped_unsized``.

Beside the checks it prints each trainer process's RSS over time and its ``malloc`` in use
(``memory/malloc_in_use_mib``, logged after every step) from the RSS baseline to the end: RSS
that rises while the memory in use stays flat is the allocator keeping freed memory, not a leak.

Metrics are logged every step (``logging.log_every=1``) so that each step's synthetic slot is
known: ``train/extra_fallback_samples`` rises exactly in the steps that had real fallback.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CAPACITY = 512  # fills within minutes at the demo's rate with 2 producers on 2 cores


def trainer_ranks(run_dir: Path) -> dict[int, int]:
    """pid -> RANK of the trainer ranks (torchrun's workers) writing ``run_dir``."""
    out = {}
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if "consumers.train" not in cmd or f"run_dir={run_dir}" not in cmd or "torch.distributed.run" in cmd \
                    or "torchrun" in cmd:
                continue
            env = dict(kv.split("=", 1) for kv in (proc / "environ").read_bytes().decode(errors="replace")
                       .split("\0") if "=" in kv)
            out[int(proc.name)] = int(env.get("RANK", -1))
        except (OSError, ValueError):
            continue
    return out


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _producer_pids(log: Path) -> dict[int, int]:
    """Producer rank -> its current pid, from launch.sh's ``producer R: pid P`` lines."""
    out = {}
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        if line.startswith("producer ") and ": pid " in line:
            rank, pid = line.split()[1].rstrip(":"), line.split(": pid ")[1].split()[0]
            out[int(rank)] = int(pid)
    return out


class StrayPeer(threading.Thread):
    """Binds a PUSH socket the trainers connect to and sends hostile messages until stopped."""

    def __init__(self, endpoint: str, every_s: float, seed: int) -> None:
        super().__init__(daemon=True, name="stray-peer")
        self.endpoint, self.every_s, self.rng = endpoint, every_s, random.Random(seed)
        self.stop = threading.Event()
        self.sent = 0

    def messages(self) -> list[list[bytes]]:
        import msgpack

        noise = bytes(self.rng.getrandbits(8) for _ in range(self.rng.randint(1, 4096)))
        return [[noise], [b""], [msgpack.packb([1, 2, 3])], [msgpack.packb({"schema": "x"}), noise],
                [msgpack.packb({"producer_id": 7, "session": "s"}), b"\x00" * 64], [noise, noise, noise]]

    def run(self) -> None:
        import zmq

        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 16)
        sock.bind(self.endpoint)
        try:
            while not self.stop.wait(self.every_s):
                for frames in self.messages():
                    try:
                        sock.send_multipart(frames, flags=zmq.NOBLOCK)
                        self.sent += 1
                    except zmq.Again:
                        pass
        finally:
            sock.close()


class Job:
    """One ``scripts/launch.sh`` of the soak, its RSS samples and its kills."""

    def __init__(self, args: argparse.Namespace, run_dir: Path, extra: list[str], log: Path) -> None:
        self.log = log
        cmd = ["bash", str(ROOT / "scripts" / "launch.sh"), "--producers", "2", "--trainers", "2",
               "--base-port", str(args.base_port), "--run-dir", str(run_dir), "--producer-restarts", "1000",
               "experiment=cpu_demo", "trainer.steps=100000000", "logging.log_every=1", "logging.wandb=false",
               "trainer.progress=false", "eval.every_steps=0", "checkpoint.every=500", "checkpoint.buffer=true",
               f"buffer.capacity={CAPACITY}", "buffer.samples_per_insert=0", "producer.log_every_s=1",
               "logging.sample_every=0",
               f"stream.endpoints=[{','.join(args.endpoints)}]", *extra]
        env = dict(os.environ, PYTHONUNBUFFERED="1", EDSAM_STOP_GRACE_S="120")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def sigterm_everything(self) -> int:
        """SIGTERM to every process of the job at once, as ``scancel`` does; the job's exit status."""
        for pid in job_processes(self.proc.pid):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        return self.proc.wait(600)


def job_processes(root: int) -> list[int]:
    """``root`` and every process descended from it, whatever its session (ranks run in sessions
    of their own): what SLURM signals when it cancels or preempts a job."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(proc.name))
    todo, seen = [root], []
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.append(pid)
            todo += children.get(pid, [])
    return seen


def _phase(args, run_dir: Path, extra: list[str], seconds: float, rng: random.Random, samples: list, kills: list,
           phase: int) -> int:
    """Run one launch for ``seconds`` with producer kills, sampling RSS; end it with SIGTERM to
    every process. Returns launch.sh's exit status."""
    job = Job(args, run_dir, extra, run_dir.parent / f"launch{phase}.log")
    start = time.monotonic()
    next_kill = start + rng.uniform(0.5, 1.5) * args.kill_every_s
    while time.monotonic() - start < seconds:
        if job.proc.poll() is not None:
            return job.proc.returncode
        now = time.monotonic()
        for pid, rank in trainer_ranks(run_dir).items():
            rss = _rss_mib(pid)
            if rss is not None:
                samples.append({"time": time.time(), "phase": phase, "pid": pid, "rank": rank, "rss_mib": rss})
        if now >= next_kill:
            pids = _producer_pids(job.log)
            if pids:
                rank = rng.choice(sorted(pids))
                try:
                    os.kill(pids[rank], signal.SIGKILL)
                    kills.append({"time": time.time(), "phase": phase, "producer": rank})
                except ProcessLookupError:
                    pass
            next_kill = now + rng.uniform(0.5, 1.5) * args.kill_every_s
        time.sleep(2.0)
    return job.sigterm_everything()


# ----------------------------------------------------------------------------- the checks


def check_steps(records: list[dict]) -> tuple[bool, str, list[int]]:
    """Every step logged, in order, once per process; the resumed process continues where the
    checkpoint left it (a step may repeat only across the resume). Returns the steps in order."""
    steps = [r["step"] for r in records if "train/loss" in r]
    if not steps:
        return False, "no trained step logged", []
    missing = sorted(set(range(1, max(steps) + 1)) - set(steps))
    ok = not missing and steps[0] == 1
    return ok, f"{max(steps)} steps, {len(missing)} missing{f' (e.g. {missing[:5]})' if missing else ''}", steps


def full_slot_share(records: list[dict], first_step: int, last_step: int) -> tuple[float, int]:
    """Share of steps in [first_step, last_step] without real fallback in the synthetic slot: the
    cumulative ``train/extra_fallback_samples`` did not rise in the step (logged every step)."""
    by_step = {}
    previous = None
    for r in records:
        if "train/extra_fallback_samples" not in r:
            continue
        value = r["train/extra_fallback_samples"]
        rise = value - previous if previous is not None and value >= previous else value
        by_step[r["step"]] = rise == 0
        previous = value
    window = [ok for step, ok in by_step.items() if first_step <= step <= last_step]
    return (sum(window) / len(window) if window else float("nan")), len(window)


def rss_growth(samples: list[dict], since: dict[tuple[int, int], float]) -> dict[str, float]:
    """Per trainer process (phase, rank): its RSS at ``since[(phase, rank)]`` -> its largest after."""
    out = {}
    for (phase, rank), start in since.items():
        rows = [s["rss_mib"] for s in samples if s["phase"] == phase and s["rank"] == rank and s["time"] >= start]
        if len(rows) >= 2:
            out[f"phase{phase}/rank{rank}"] = max(rows) / rows[0] - 1.0
    return out


RSS_MINUTES = (0.5, 1, 2, 3, 5, 7, 10, 15, 20, 25, 29.5)


def rss_table(samples: list[dict]) -> str:
    """Each trainer process's RSS (MiB) at ``RSS_MINUTES`` since its first sample (the last
    sample at or before each), as a Markdown table."""
    lines = ["| process | " + " | ".join(f"{m:g}" for m in RSS_MINUTES) + " |",
             "|---|" + "---:|" * len(RSS_MINUTES)]
    for phase, rank in sorted({(s["phase"], s["rank"]) for s in samples}):
        rows = [s for s in samples if s["phase"] == phase and s["rank"] == rank]
        at = [[s["rss_mib"] for s in rows if s["time"] - rows[0]["time"] <= m * 60] for m in RSS_MINUTES]
        lines.append(f"| rank {rank}, {'first launch' if phase == 0 else 'resumed'} | "
                     + " | ".join(f"{a[-1]:.0f}" if a else "" for a in at) + " |")
    return "\n".join(lines)


def trained_records(run_dir: Path) -> dict[int, list[dict]]:
    """Trainer rank -> its records of trained steps, both launches."""
    from edsam_online.metrics import read_jsonl

    return {rank: [r for r in read_jsonl(run_dir / "metrics" / f"trainer{rank}.jsonl") if "train/loss" in r]
            for rank in (0, 1)}


def _phase_of(time_: float, phase_starts: list[float]) -> int:
    return max(i for i, start in enumerate(phase_starts) if time_ >= start)


def malloc_in_use(trained: dict[int, list[dict]], phase_starts: list[float], since: dict[tuple[int, int], float],
                  window: int = 50) -> dict[str, tuple[float, float]]:
    """Per trainer process: the median of ``memory/malloc_in_use_mib`` over its first ``window``
    records from ``since`` and over its last ``window``. Logged after each step, so it is the
    live heap at one point of the step: flat while RSS rises means the allocator's high-water
    mark (freed memory it keeps), rising means something holds more memory."""
    out = {}
    for (phase, rank), start in since.items():
        values = [r["memory/malloc_in_use_mib"] for r in trained[rank]
                  if "memory/malloc_in_use_mib" in r and _phase_of(r["time"], phase_starts) == phase
                  and r["time"] >= start]
        if len(values) >= 2 * window:
            out[f"phase{phase}/rank{rank}"] = (statistics.median(values[:window]), statistics.median(values[-window:]))
    return out


def rss_baselines(trained: dict[int, list[dict]], phase_starts: list[float], warmup_steps: int) -> dict[str, dict]:
    """(phase, rank) -> wall times for each trainer process: ``filled``, when its buffer first
    held ``CAPACITY`` items, and ``warm``, the later of that and its ``warmup_steps``-th step.

    A process's RSS grows over its first steps whatever its buffer does (the optimizer's state,
    autograd's and the allocator's caches, the loader's prefetch): the first process's buffer
    fills minutes in, past that, but a resumed one restores a full buffer before its first step,
    so "from the fill" would count its start-up as growth. The check therefore measures both
    from ``warm``, the same warm-up the full-slot check skips; growth from ``filled`` is printed
    beside it."""
    filled, warm = {}, {}
    for rank, records in trained.items():
        first: dict[int, int] = {}
        for r in records:
            phase = _phase_of(r["time"], phase_starts)
            first.setdefault(phase, r["step"])
            if r.get("buffer/size", 0) >= CAPACITY:
                filled.setdefault((phase, rank), r["time"])
            if (phase, rank) in filled and r["step"] >= first[phase] + warmup_steps:
                warm.setdefault((phase, rank), r["time"])
    return {"filled": filled, "warm": warm}


def tracebacks(run_dir: Path, logs: list[Path]) -> list[str]:
    return [str(p) for p in [*sorted((run_dir / "logs").glob("*.log")), *logs]
            if p.exists() and "Traceback" in p.read_text(errors="replace")]


def ledger_check(run_dir: Path, kills: int) -> tuple[bool, str]:
    """Exact for the processes that ended cleanly; bounded by what ``kill -9`` hides for the rest."""
    from edsam_online.ledger import format_ledger, ledger
    from edsam_online.metrics import read_jsonl

    book = ledger(run_dir)
    # a killed producer's unknown window: one log period of its generation plus its send queue
    rates = [r.get("producer/samples_per_s", 0.0) for p in (run_dir / "metrics").glob("producer*.jsonl")
             for r in read_jsonl(p)]
    per_kill = max(rates, default=0.0) * 1.0 + 2 * 4 * 4  # 1 s at the fastest rate + 2 queued batches of M x batch
    bound = kills * per_kill
    ok = abs(book.generation_gap) <= bound and abs(book.stream_gap) <= bound
    return ok, (f"{format_ledger(book)}\n  kill -9: {kills} producer processes; unknowable at most "
                f"{bound:.0f} samples; generation gap {book.generation_gap}, stream gap {book.stream_gap}")


def check(out: Path) -> int:
    """The checks on the soak in ``out`` (its ``run`` folder and the raw record ``soak.json``):
    printed, added to ``soak.json``; 1 if any fails."""
    soak = json.loads((out / "soak.json").read_text())
    args = argparse.Namespace(**soak["args"])
    run_dir, starts, statuses, samples = out / "run", soak["phase_starts"], soak["statuses"], soak["rss_samples"]
    trained = trained_records(run_dir)
    records = trained[0]
    results = {}
    results["exit 0 after each SIGTERM"] = (all(s == 0 for s in statuses), f"launch.sh exit statuses {statuses}")
    steps_ok, steps_msg, steps = check_steps(records)
    results["every step trained"] = (steps_ok, steps_msg)
    resumed_at = next((r["step"] for r in records if r["time"] >= starts[1]), None)
    share, n = full_slot_share(records, args.warmup_steps, max(steps, default=0))
    after, n_after = (full_slot_share(records, resumed_at, resumed_at + args.after_resume - 1)
                      if resumed_at else (float("nan"), 0))
    results["full synthetic slot"] = (share >= 0.95 and after >= 0.95,
                                      f"{share:.3f} of {n} steps after step {args.warmup_steps}; {after:.3f} of the "
                                      f"{n_after} steps from the resume at step {resumed_at}")
    since = rss_baselines(trained, starts, args.warmup_steps)
    growth, from_fill = rss_growth(samples, since["warm"]), rss_growth(samples, since["filled"])
    results["trainer RSS growth <= 5% after the buffer fills"] = (
        bool(growth) and len(growth) == len(from_fill) and all(g <= 0.05 for g in growth.values()),
        (", ".join(f"{k} {v:+.1%}" for k, v in growth.items()) or "the buffer never filled")
        + f" (from {args.warmup_steps} steps into each process and its buffer full; from the fill alone: "
        + ", ".join(f"{k} {v:+.1%}" for k, v in from_fill.items()) + ")")
    bad = tracebacks(run_dir, [out / f"launch{i}.log" for i in range(2)])
    results["no unhandled exception in any log"] = (not bad, ", ".join(bad) or "none")
    results["ledger"] = ledger_check(run_dir, len(soak["kills"]))
    print(f"soak: {args.minutes:g} minutes, 2 producers x 2 trainers, {len(soak['kills'])} producer kills (kill -9), "
          f"1 trainer-wide SIGTERM + resume, {soak['hostile_messages']} hostile messages\n")
    for name, (ok, msg) in results.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {msg}")
    live = malloc_in_use(trained, starts, since["warm"])
    print("\ntrainer malloc in use (MiB, median of 50 steps) from the RSS baseline to the end: "
          + (", ".join(f"{k} {a:.0f} -> {b:.0f}" for k, (a, b) in live.items()) or "not logged"))
    print(f"\ntrainer RSS (MiB) at minutes since each process's first sample:\n{rss_table(samples)}")
    soak["results"] = {k: {"ok": ok, "detail": msg} for k, (ok, msg) in results.items()}
    (out / "soak.json").write_text(json.dumps(soak, indent=1))
    return 0 if all(ok for ok, _ in results.values()) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--out", default=None, help="folder of the run and the soak's JSON (default runs/soak-<time>)")
    parser.add_argument("--kill-every-s", type=float, default=240.0)
    parser.add_argument("--hostile-every-s", type=float, default=5.0)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--after-resume", type=int, default=50)
    parser.add_argument("--base-port", type=int, default=5655)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", metavar="DIR", help="only check the soak already run in DIR (its --out)")
    args = parser.parse_args()
    if args.check:
        return check(Path(args.check).resolve())
    out = Path(args.out or ROOT / "runs" / f"soak-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    run_dir = out / "run"
    if run_dir.exists():  # its checkpoints would be resumed, its metrics appended to
        parser.error(f"{out} already holds a soak: choose another --out, or --check {out}")
    out.mkdir(parents=True, exist_ok=True)
    stray = f"tcp://127.0.0.1:{args.base_port + 2}"
    args.endpoints = [f"'tcp://127.0.0.1:{args.base_port + i}'" for i in range(2)] + [f"'{stray}'"]
    rng = random.Random(args.seed)
    peer = StrayPeer(stray, args.hostile_every_s, args.seed)
    peer.start()
    samples, kills, starts, statuses = [], [], [], []
    half = args.minutes * 60 / 2
    try:
        for phase, extra in enumerate(([], ["checkpoint.resume=latest"])):
            starts.append(time.time())
            statuses.append(_phase(args, run_dir, extra, half, rng, samples, kills, phase))
    finally:
        peer.stop.set()
        peer.join(10)
    (out / "soak.json").write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "check"},
                                               "phase_starts": starts, "statuses": statuses, "kills": kills,
                                               "hostile_messages": peer.sent, "rss_samples": samples}, indent=1))
    return check(out)


if __name__ == "__main__":
    sys.exit(main())
