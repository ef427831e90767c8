"""The GPU check's steps, each run in its own process with its own timeout (``bench/gpu_check.sh``).

``python bench/gpu_check.py [--device cuda|cpu] [--tiny] [--out DIR] [--only STEP,...]`` runs
every step, prints one markdown table (step, status, seconds, result) and exits 1 if any step
failed or hung. A step that hangs is killed with its whole process group when its timeout
runs out and shows as ``TIMEOUT``, so a hang names itself instead of ending the output.

Steps (``--tiny`` on ``--device cpu`` runs the same steps with tiny models, in seconds):

- ``env``: torch, CUDA and the project's packages import; the device is visible.
- ``sampler``: the ED-SAM sampler with the paper's generator architecture
  (``random:CompVis/ldm-text2im-large-256``, random weights, 256 px, M = 10, 10 steps,
  guidance 3), samples/s in fp32, bf16, bf16 + channels_last and bf16 + channels_last +
  ``torch.compile``, one model in one process. Each variant's row is written as it finishes.
- ``trainer``: ``bench/bench_trainer.py`` with CLIP ViT-B-16 in bf16 at 224 px: the online mix
  (half real, half synthetic from the buffer, fed over ZeroMQ) against real-only, samples/s.
- ``loss``: a 1-rank process group (NCCL on CUDA, gloo on CPU) under torchrun: Eq. 11's loss
  from features gathered with open_clip's ``gather_features`` (with grad) equals the local
  loss, with the same gradients, and an all_reduce crosses the backend.
- ``stream``: ``scripts/launch.sh`` with one producer and one trainer on the device for
  ``--stream-seconds``: the trainer must have received and trained on generated samples.
- ``sd_1gpu``: ``scripts/launch.sh experiment=sd_1gpu`` for ``--sd-steps`` steps (default 300), producer
  and trainer sharing the device: Stable Diffusion v1.5's architecture with random weights at 512 px,
  CLIP ViT-B-32 at 224 px, shards written by ``scripts/make_shards.py``; the trainer's and the
  producer's samples/s, the step time and the GPU's peak memory. On a 15-minute lend run it alone
  first: ``--only sd_1gpu``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAPER_GENERATOR = "random:CompVis/ldm-text2im-large-256"
#: Sampler variants in the order they run: (name, dtype, channels_last, compile). channels_last
#: converts the networks in place, so the plain layouts come first.
SAMPLER_VARIANTS = (("fp32", "fp32", False, False), ("bf16", "bf16", False, False),
                    ("bf16+channels_last", "bf16", True, False), ("bf16+channels_last+compile", "bf16", True, True))
# experiment=sd_1gpu on CPU (step sd_1gpu with --device cpu, and the user-path test): the preset's
# GPU settings swapped for CPU ones, its sizes for a few seconds' worth per step
SD_1GPU_ON_CPU = ["runtime=cpu", "diffusion.device=cpu", "diffusion.dtype=fp32", "diffusion.channels_last=false",
                  "diffusion.resolution=64", "diffusion.m=2", "diffusion.steps=2", "diffusion.inversion_steps=2",
                  "diffusion.batch_size=2", "producer.batch_size=2", "runtime.num_workers=1", "runtime.threads=1",
                  "trainer.batch_size=8", "mix.extra_share=0.5", "buffer.capacity=64", "buffer.min_size_to_sample=2",
                  "buffer.samples_per_insert=0", "buffer.error_buffer=null", "mix.extra_wait_s=2.0",
                  "optim.warmup_steps=2", "eval.samples_per_class=2", "eval.probe_train_per_class=3",
                  "eval.probe_steps=10", "eval.domains=[flat]", "data.shuffle_buffer=16"]


# ----------------------------------------------------------------------------- steps (child processes)


def step_env(args: argparse.Namespace) -> dict:
    import importlib.metadata as md

    import torch

    info = {"python": sys.version.split()[0], "executable": sys.executable, "torch": torch.__version__,
            "cuda_available": torch.cuda.is_available()}
    for pkg in ("diffusers", "transformers", "open_clip_torch", "torchdata", "pyzmq", "hydra-core"):
        info[pkg] = md.version(pkg)
    import edsam_online.diffusion  # noqa: F401  the library and its diffusion stack import
    import edsam_online.trainer  # noqa: F401

    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda but torch sees no CUDA device")
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
        x = torch.randn(1024, 1024, device="cuda")
        torch.cuda.synchronize()
        info["matmul_ok"] = bool(torch.isfinite(x @ x).all())
    info["summary"] = f"torch {info['torch']}" + (f", {info['gpu']}" if "gpu" in info else ", cpu")
    return info


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def step_sampler(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from edsam_online.data import render_sample
    from edsam_online.diffusion import EDSAMSampler, SamplerConfig
    from edsam_online.diffusion.pipeline import LatentDiffusion
    from edsam_online.diffusion.registry import load_sampler_ldm

    if args.tiny:
        cfg = SamplerConfig(model="tiny-random", resolution=32, m=2, steps=2, inversion_steps=2, device=args.device)
        batch, warmup, iters = 2, 1, 2
    else:
        cfg = SamplerConfig(model=PAPER_GENERATOR, resolution=256, m=10, steps=10, inversion_steps=10,
                            batch_size=args.sampler_batch * 10, device=args.device)
        batch, warmup, iters = args.sampler_batch, 1, args.sampler_iters
    t0 = time.perf_counter()
    base = load_sampler_ldm(cfg)
    build_s = time.perf_counter() - t0
    samples = [render_sample(i, "flat", cfg.resolution, 0) for i in range(batch)]
    images = np.stack([s.image for s in samples])
    captions, keys = [s.caption for s in samples], [s.key for s in samples]
    rows = []
    for name, dtype, channels_last, compile_ in SAMPLER_VARIANTS:
        ldm = LatentDiffusion(base.vae, base.unet, base.text_encoder, base.tokenizer, base.scheduler.config,
                              model_id=base.model_id, layout=base.layout,
                              cfg=replace(cfg, dtype=dtype, channels_last=channels_last, compile=compile_))
        sampler = EDSAMSampler(ldm, cfg)
        t0 = time.perf_counter()
        for i in range(warmup):
            sampler.generate(images, captions, keys, seed=i)
        _sync(cfg.device)
        warm_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        n = 0
        for i in range(iters):
            n += len(sampler.generate(images, captions, keys, seed=100 + i))
        _sync(cfg.device)
        elapsed = time.perf_counter() - t0
        row = {"variant": name, "samples_per_s": n / elapsed, "warmup_s": warm_s, "samples": n}
        if cfg.device.startswith("cuda"):
            row["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        rows.append(row)
        _partial(args, {"rows": rows})  # a later hang (compile) keeps the finished rows
        print(f"sampler {name}: {row['samples_per_s']:.2f} samples/s (warm-up {warm_s:.1f} s)", flush=True)
    fp32 = rows[0]["samples_per_s"]
    summary = ", ".join(f"{r['variant']} {r['samples_per_s']:.2f}/s ({r['samples_per_s'] / fp32:.2f}x)" for r in rows)
    return {"model": cfg.model, "resolution": cfg.resolution, "m": cfg.m, "steps": cfg.steps,
            "guidance": cfg.guidance, "source_images_per_batch": batch, "build_s": build_s, "rows": rows,
            "summary": summary}


def step_trainer(args: argparse.Namespace) -> dict:
    if args.tiny:
        opts = ["--model", "edsam-tiny", "--resolution", "32", "--batch", "16", "--steps", "4", "--warmup", "1"]
    else:
        opts = ["--model", "ViT-B-16", "--resolution", "224", "--batch", str(args.trainer_batch), "--steps", "10",
                "--warmup", "3", "--workers", "8", "--feed-rate", "2000"]
    out = Path(args.json).with_suffix(".bench.json")
    cmd = [sys.executable, str(ROOT / "bench" / "bench_trainer.py"), *opts, "--rounds", "1",
           "--device", args.device, "--precision", "bf16", "--json", str(out)]
    subprocess.run(cmd, check=True, cwd=ROOT)
    result = json.loads(out.read_text())
    modes = {m["mode"]: m for m in result["modes"]}
    if modes["mix"]["synthetic_fill"] <= 0:
        raise RuntimeError("the mix mode trained on no synthetic sample")
    result["summary"] = (f"{result['model']} {result['batch']}/step: real {modes['real']['samples_per_s']:.0f}/s, "
                         f"mix {modes['mix']['samples_per_s']:.0f}/s ({modes['mix']['vs_real']:.2f}x), "
                         f"mix data wait {modes['mix']['data_wait_frac']:.2f}")
    return result


def step_loss(args: argparse.Namespace) -> dict:
    """Runs under torchrun (1 rank)."""
    import torch
    import torch.distributed as dist
    from open_clip.loss import gather_features

    from edsam_online.losses import EDSAMLoss, LossConfig
    from edsam_online.runtime import init_distributed

    info = init_distributed(args.device)
    backend = dist.get_backend()
    gen = torch.Generator().manual_seed(0)
    feats = [torch.randn(16, 32, generator=gen).to(info.device).requires_grad_(True) for _ in range(4)]
    scale = torch.tensor(10.0, device=info.device)

    def normed(fs):
        return [f / f.norm(dim=-1, keepdim=True) for f in fs]

    loss_fn = EDSAMLoss(LossConfig(), info.rank, info.world_size)
    local = loss_fn(*normed(feats[:2]), scale, *normed(feats[2:]))["loss"]
    local_grads = torch.autograd.grad(local, feats)
    ri, rt, si, st = normed(feats)
    gathered = []
    for img, txt in ((ri, rt), (si, st)):  # what ClipLoss does with more than one rank
        all_img, all_txt = gather_features(img, txt, local_loss=True, gather_with_grad=True, rank=info.rank,
                                           world_size=info.world_size)
        gathered += [all_img, all_txt]
    loss = loss_fn(gathered[0], gathered[1], scale, gathered[2], gathered[3])["loss"]
    grads = torch.autograd.grad(loss, feats)
    total = torch.tensor([1.0], device=info.device)
    dist.all_reduce(total)
    ok = (torch.allclose(loss, local, atol=1e-5) and all(torch.allclose(a, b, atol=1e-5)
                                                            for a, b in zip(grads, local_grads))
          and total.item() == info.world_size)
    dist.barrier()
    dist.destroy_process_group()
    if not ok:
        raise RuntimeError(f"gathered loss {loss.item():.6f} != local {local.item():.6f}, or gradients differ")
    return {"backend": backend, "world_size": info.world_size, "loss": loss.item(),
            "summary": f"{backend}, world {info.world_size}: gathered Eq. 11 loss = local ({loss.item():.4f}), grads equal"}


def step_stream(args: argparse.Namespace) -> dict:
    """launch.sh until the trainer's first logged step, then ``--stream-seconds`` more; the
    window's first and last trainer records give what streamed in it."""
    from edsam_online.metrics import read_jsonl

    run_dir = Path(args.json).parent / "stream_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = ["bash", str(ROOT / "scripts" / "launch.sh"), "--run-dir", str(run_dir), "--producer-restarts", "0",
           "experiment=cpu_demo", "trainer.steps=1000000", "logging.wandb=false", "logging.log_every=5",
           "trainer.progress=false", "checkpoint.every=0"]
    if args.device == "cuda":
        cmd[2:2] = ["--producer-devices", "0", "--trainer-devices", "0"]
    env = dict(os.environ, EDSAM_STOP_GRACE_S="20", PYTHONUNBUFFERED="1")
    metrics = run_dir / "metrics"

    def records(role: str) -> list[dict]:
        path = metrics / f"{role}0.jsonl"
        return [r for r in read_jsonl(path) if role != "trainer" or "train/loss" in r] if path.exists() else []

    with open(Path(args.json).with_suffix(".log"), "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            while not records("trainer"):
                if proc.poll() is not None:
                    raise RuntimeError(f"launch.sh ended (status {proc.returncode}) before the trainer's first "
                                       f"logged step; see {log.name}")
                time.sleep(0.5)
            first = records("trainer")[0]
            time.sleep(args.stream_seconds)
            if proc.poll() is not None:
                raise RuntimeError(f"launch.sh ended (status {proc.returncode}) while streaming; see {log.name}")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)  # launch.sh stops its ranks; the trainer checkpoints
                proc.wait(60)
    last = records("trainer")[-1]
    steps = last["step"] - first["step"]
    received = last.get("buffer/accepted", 0) - first.get("buffer/accepted", 0)
    trained = last.get("train/extra_samples", 0) - first.get("train/extra_samples", 0)
    if steps <= 0 or received <= 0 or trained <= 0:
        raise RuntimeError(f"in {args.stream_seconds} s of streaming: {steps} steps, {received} samples received, "
                           f"{trained} generated samples trained on (each must be > 0)")
    window = max(last["time"] - first["time"], 1e-9)
    producer_rate = max((r.get("producer/samples_per_s", 0.0) for r in records("producer")), default=float("nan"))
    return {"window_s": window, "steps": steps, "received": received, "extra_trained": trained,
            "steps_per_s": steps / window, "received_per_s": received / window, "producer_samples_per_s": producer_rate,
            "extra_share_actual": last.get("train/extra_share_actual"),
            "summary": (f"{window:.0f} s window: {steps} steps ({steps / window:.1f}/s), {received} samples received "
                        f"({received / window:.1f}/s), {trained} trained on; producer {producer_rate:.1f}/s")}


SD_GENERATOR = "random:runwayml/stable-diffusion-v1-5"


def _gpu_memory_mib() -> float | None:
    """Memory in use on the GPU, all processes (nvidia-smi), or None without it."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return float(out.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def step_sd_1gpu(args: argparse.Namespace) -> dict:
    """``experiment=sd_1gpu`` through launch.sh for ``--sd-steps`` steps, producer and trainer on
    one device: Stable Diffusion v1.5's architecture (random weights) at 512 px and CLIP
    ViT-B-32 at 224 px on webdataset shards of built-in images; with ``--tiny``, a tiny SD folder
    and a cut-down ViT-B-32 on CPU. Reports the trainer's samples/s and step time, the producer's
    samples/s and the GPU memory both used at their peak."""
    from edsam_online.metrics import read_jsonl

    work = Path(args.json).parent / "sd_1gpu"
    shutil.rmtree(work, ignore_errors=True)
    run_dir = work / "run"
    resolution, per_domain = (64, 64) if args.tiny else (256, 1024)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_shards.py"), "--webdataset", str(work / "data"),
                    "--domains", "flat", "--per-domain", str(per_domain), "--resolution", str(resolution)],
                   check=True, cwd=ROOT)
    cmd = ["bash", str(ROOT / "scripts" / "launch.sh"), "--run-dir", str(run_dir), "--producer-restarts", "0",
           "experiment=sd_1gpu", f"data.path={work / 'data' / 'flat'}", f"trainer.steps={args.sd_steps}",
           "logging.wandb=false", "trainer.progress=false", "checkpoint.every=0", "logging.log_every=10"]
    if args.device == "cuda":  # a smaller warm-up than the preset's, so that a short check trains on samples
        cmd[2:2] = ["--producer-devices", "0", "--trainer-devices", "0"]
        cmd += [f"diffusion.model={SD_GENERATOR}", "buffer.min_size_to_sample=32"]
    else:
        from edsam_online.diffusion import SamplerConfig, build_tiny_ldm
        from edsam_online.models import write_stand_in

        build_tiny_ldm(SamplerConfig(resolution=64), layout="sd").save_pretrained(work / "sd")
        cmd += [f"diffusion.model={work / 'sd'}", f"model.name={write_stand_in('ViT-B-32', work / 'clip')}",
                *SD_1GPU_ON_CPU]
    peak_memory = None
    with open(Path(args.json).with_suffix(".log"), "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        while proc.poll() is None:
            used = _gpu_memory_mib() if args.device == "cuda" else None
            peak_memory = used if peak_memory is None or (used or 0) > peak_memory else peak_memory
            time.sleep(1.0)
    if proc.returncode != 0:
        raise RuntimeError(f"launch.sh experiment=sd_1gpu ended with status {proc.returncode}; see {log.name}")
    records = [r for r in read_jsonl(run_dir / "metrics" / "trainer0.jsonl") if "train/loss" in r]
    last = records[-1]
    if last["step"] != args.sd_steps or last.get("train/extra_samples", 0) <= 0:
        raise RuntimeError(f"sd_1gpu: ended at step {last['step']} of {args.sd_steps} with "
                           f"{last.get('train/extra_samples', 0)} generated samples trained on")
    later = records[len(records) // 2:]  # past start-up
    rate = sum(r.get("train/samples_per_s", 0.0) for r in later) / len(later)
    step_s = sum(r.get("train/step_time_s", 0.0) for r in later) / len(later)
    producer = [r.get("producer/samples_per_s", 0.0) for r in read_jsonl(run_dir / "metrics" / "producer0.jsonl")]
    producer_rate = max(producer, default=float("nan"))
    return {"steps": last["step"], "trainer_samples_per_s": rate, "step_time_s": step_s,
            "producer_samples_per_s": producer_rate, "gpu_memory_peak_mib": peak_memory,
            "extra_share_actual": last.get("train/extra_share_actual"),
            "summary": (f"{last['step']} steps: trainer {rate:.0f} samples/s ({step_s:.3f} s/step), producer "
                        f"{producer_rate:.1f} samples/s, extra share {last.get('train/extra_share_actual', 0):.2f}"
                        + (f", GPU memory peak {peak_memory:.0f} MiB" if peak_memory else ""))}


#: In the order they run: the sampler, whose torch.compile variant takes longest, last.
STEP_FUNCTIONS = {"env": step_env, "loss": step_loss, "trainer": step_trainer, "stream": step_stream,
                  "sd_1gpu": step_sd_1gpu, "sampler": step_sampler}


def _partial(args: argparse.Namespace, result: dict) -> None:
    Path(args.json).with_suffix(".partial.json").write_text(json.dumps(result))


# ----------------------------------------------------------------------------- the orchestrator


def _timeouts(args: argparse.Namespace) -> dict[str, int]:
    if args.tiny:
        return {"env": 120, "sampler": 240, "trainer": 180, "loss": 120, "stream": args.stream_seconds + 120,
                "sd_1gpu": 300}
    return {"env": 90, "sampler": 240, "trainer": 120, "loss": 60, "stream": args.stream_seconds + 90, "sd_1gpu": 420}


def _child_cmd(step: str, args: argparse.Namespace, json_path: Path) -> list[str]:
    flags = ["--device", args.device, "--json", str(json_path), "--stream-seconds", str(args.stream_seconds),
             "--sampler-batch", str(args.sampler_batch), "--sampler-iters", str(args.sampler_iters),
             "--trainer-batch", str(args.trainer_batch), "--sd-steps", str(args.sd_steps),
             *(["--tiny"] if args.tiny else [])]
    if step == "loss":
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        launcher = [torchrun] if Path(torchrun).exists() else [sys.executable, "-m", "torch.distributed.run"]
        return [*launcher, "--standalone", "--nproc-per-node", "1", __file__, "step", step, *flags]
    return [sys.executable, __file__, "step", step, *flags]


def run_step(step: str, args: argparse.Namespace, out_dir: Path) -> dict:
    json_path = out_dir / f"{step}.json"
    json_path.unlink(missing_ok=True)
    timeout = _timeouts(args)[step]
    print(f"[gpu_check] {step}: started (timeout {timeout} s)", flush=True)
    start = time.monotonic()
    proc = subprocess.Popen(_child_cmd(step, args, json_path), cwd=ROOT, start_new_session=True)
    try:
        code = proc.wait(timeout)
        status = "PASS" if code == 0 and json_path.exists() else f"FAIL (exit {code})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        status = f"TIMEOUT ({timeout} s)"
    seconds = time.monotonic() - start
    result: dict = {}
    if json_path.exists():
        result = json.loads(json_path.read_text())
    elif json_path.with_suffix(".partial.json").exists():
        result = json.loads(json_path.with_suffix(".partial.json").read_text())
        result["summary"] = "finished before the hang: " + ", ".join(
            f"{r['variant']} {r['samples_per_s']:.2f}/s" for r in result.get("rows", []))
    print(f"[gpu_check] {step}: {status} in {seconds:.0f} s", flush=True)
    return {"step": step, "status": status, "seconds": seconds, "result": result}


def orchestrate(args: argparse.Namespace) -> int:
    out_dir = Path(args.out or os.environ.get("OUT") or ROOT / "runs" / f"gpu_check-{time.strftime('%Y%m%d-%H%M%S')}")
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = args.only.split(",") if args.only else list(STEP_FUNCTIONS)
    unknown = [s for s in steps if s not in STEP_FUNCTIONS]
    if unknown:
        print(f"gpu_check: unknown step(s) {unknown}; steps are {list(STEP_FUNCTIONS)}", file=sys.stderr)
        return 2
    rows = [run_step(step, args, out_dir) for step in steps]
    mode = f"--device {args.device}{' --tiny' if args.tiny else ''}"
    lines = [f"gpu_check {mode}: {sum(r['status'] == 'PASS' for r in rows)} of {len(rows)} steps passed", "",
             "| step | status | seconds | result |", "|---|---|---:|---|"]
    lines += [f"| {r['step']} | {r['status']} | {r['seconds']:.0f} | {r['result'].get('summary', '')} |" for r in rows]
    table = "\n".join(lines)
    print("\n" + table, flush=True)
    (out_dir / "gpu_check.md").write_text(table + "\n")
    (out_dir / "gpu_check.json").write_text(json.dumps(rows, indent=1))
    return 0 if all(r["status"] == "PASS" for r in rows) else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="run", choices=("run", "step"))
    parser.add_argument("step", nargs="?", help="with mode 'step': the one step to run in this process")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="tiny models: the same steps in seconds (CPU)")
    parser.add_argument("--out", help="folder for the table, JSON and logs (default $OUT or runs/gpu_check-<time>)")
    parser.add_argument("--only", help="comma-separated steps to run (default: all)")
    parser.add_argument("--stream-seconds", type=int, default=30)
    parser.add_argument("--sampler-batch", type=int, default=4, help="source images per generate call (x M samples)")
    parser.add_argument("--sampler-iters", type=int, default=3, help="timed generate calls per variant")
    parser.add_argument("--trainer-batch", type=int, default=512,
                        help="images per step, real-only and mix alike (paper_cc3m: 256 real + 256 generated)")
    parser.add_argument("--sd-steps", type=int, default=300, help="trainer steps of the sd_1gpu step")
    parser.add_argument("--json", help="with mode 'step': where the step writes its result")
    args = parser.parse_args()
    if args.mode == "run":
        sys.exit(orchestrate(args))
    result = STEP_FUNCTIONS[args.step](args)
    Path(args.json).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
