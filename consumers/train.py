"""Trainer rank: ``torchrun --nproc-per-node N -m consumers.train <hydra overrides>``.

Each rank: a process group (gloo on CPU, NCCL on GPU), a CLIP from open_clip
under DDP, a local replay buffer fed by a ZeroMQ receiver thread, the mixed
loader, and Eq. 11 (see ``edsam_online.loader`` for what a step without
synthetic samples does). Metrics go to ``<run_dir>/metrics/trainer<rank>.jsonl``
and, on rank 0, an offline W&B run. Also runs as a single process without
torchrun (``python -m consumers.train``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import sys
import time
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from edsam_online.buffer import ReplayBuffer
from edsam_online.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from edsam_online.config import Config, load_config
from edsam_online.eval import evaluate, format_eval_table
from edsam_online.loader import MixedBatch, MixedLoader
from edsam_online.losses import EDSAMLoss
from edsam_online.metrics import MetricLogger
from edsam_online.models import create_clip
from edsam_online.optim import build_optimizer, build_scheduler, clamp_logit_scale, clip_gradients
from edsam_online.streaming import Receiver

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _init_distributed(cfg: Config) -> tuple[int, int, int, torch.device]:
    want_cuda = cfg.trainer.device == "cuda" or (cfg.trainer.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise ValueError("trainer.device: cuda requested but no CUDA device is visible")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if want_cuda:
        torch.cuda.set_device(local_rank)
    backend = "nccl" if want_cuda else "gloo"
    if "WORLD_SIZE" in os.environ:  # torchrun
        dist.init_process_group(backend)
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    device = torch.device("cuda", local_rank) if want_cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), local_rank, device


def _shared_run_dir(run_dir: str) -> str:
    """Every rank uses rank 0's run_dir (``${now:...}`` may differ across ranks)."""
    holder = [os.path.abspath(run_dir)]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


class _Window:
    """Sums over the steps since the last log line."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.steps = 0
        self.time = self.wait = 0.0
        self.images = self.real = self.syn = 0.0
        self.loss = self.loss_real = self.loss_syn = 0.0
        self.syn_steps = 0


def _forward_loss(model, loss_fn, batch: MixedBatch, use_syn: bool, device, precision, channels_last):
    real_n = batch.real_images.shape[0]
    images, texts = batch.real_images, batch.real_texts
    if use_syn:
        images = torch.cat([images, batch.syn_images])
        texts = torch.cat([texts, batch.syn_texts])
    images = images.to(device, non_blocking=True)
    texts = texts.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    dtype = _DTYPES[precision]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with autocast:
        out = model(images, texts)
    image_f, text_f, logit_scale = out[0].float(), out[1].float(), out[2].float()
    logit_bias = out[3].float() if len(out) > 3 else None
    return loss_fn(
        image_f[:real_n],
        text_f[:real_n],
        logit_scale,
        image_f[real_n:] if use_syn else None,
        text_f[real_n:] if use_syn else None,
        logit_bias=logit_bias,
        use_syn=use_syn,
    ), logit_scale


def train(cfg: Config, resolved: dict) -> None:
    rank, world, local_rank, device = _init_distributed(cfg)
    run_dir = _shared_run_dir(cfg.run_dir)
    tcfg = cfg.trainer
    if tcfg.threads > 0:
        torch.set_num_threads(tcfg.threads)
    torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's)

    model, preprocess_train, preprocess_val, tokenizer = create_clip(cfg.model, device=str(device))
    if tcfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    raw_model = model
    if tcfg.compile:
        model = torch.compile(model)
    ddp = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)

    syn_batch = tcfg.syn_batch_size
    buffer = receiver = None
    if syn_batch > 0:
        buffer = ReplayBuffer(dataclasses.replace(cfg.buffer, seed=cfg.buffer.seed + rank))
        receiver = Receiver(cfg.stream, buffer, rank=rank).start()
    loader = MixedLoader(
        cfg.data,
        preprocess_train,
        tokenizer,
        real_batch=tcfg.real_batch_size,
        syn_batch=syn_batch,
        buffer=buffer,
        syn_wait_s=tcfg.syn_wait_s,
        rank=rank,
        world_size=world,
        num_workers=tcfg.num_workers,
        prefetch=tcfg.prefetch,
    )
    optimizer = build_optimizer(raw_model, tcfg)
    scheduler = build_scheduler(optimizer, tcfg)
    scaler = torch.amp.GradScaler(device.type) if tcfg.precision == "fp16" else None
    loss_fn = EDSAMLoss(tcfg.loss, tcfg.syn_weight, rank, world)

    step, totals = 0, {"steps_without_syn": 0, "syn_samples": 0, "syn_fallback_samples": 0}
    ckpt = resolve_resume(tcfg.resume, run_dir)
    if ckpt is not None:
        state = load_checkpoint(ckpt, raw_model, optimizer, scheduler, scaler)
        step = state["step"]
        totals.update(state["extra"].get("totals", {}))
        loader_states = state["loader_states"] or []
        if len(loader_states) == world:
            loader.load_state_dict(loader_states[rank])
        elif rank == 0:
            print(f"[trainer] checkpoint has {len(loader_states)} loader states for world size {world}: "
                  "the real-data stream restarts", file=sys.stderr)
        if rank == 0:
            print(f"[trainer] resumed from {ckpt} at step {step}", file=sys.stderr)

    logger = MetricLogger(cfg.logging, run_dir, "trainer", rank, config=resolved)
    keys_file = None
    if tcfg.record_keys:
        (Path(run_dir) / "keys").mkdir(parents=True, exist_ok=True)
        keys_file = open(Path(run_dir) / "keys" / f"trainer{rank}.jsonl", "a", buffering=1, encoding="utf-8")
    end = min(tcfg.stop_at or tcfg.steps, tcfg.steps)
    bar = tqdm(total=end, initial=step, desc="train", disable=rank != 0 or not tcfg.progress, dynamic_ncols=True)

    def checkpoint(at: int) -> None:
        states = [None] * world
        dist.all_gather_object(states, loader.state_dict())
        if rank == 0:
            save_checkpoint(run_dir, at, raw_model, optimizer, scheduler, scaler, states,
                            extra={"totals": totals}, keep_last=tcfg.keep_checkpoints)
        dist.barrier()

    def run_eval(at: int) -> dict[str, float]:
        metrics = {}
        if rank == 0:
            metrics = evaluate(raw_model, tokenizer, preprocess_val, cfg.eval, device=str(device))
            logger.log(metrics, step=at)
        dist.barrier()
        return metrics

    window = _Window()
    data_iter = iter(loader)
    ddp.train()
    last = time.perf_counter()
    while step < end:
        t0 = time.perf_counter()
        try:
            batch = next(data_iter)
        except StopIteration:  # a finite data.epochs ran out
            break
        t_data = time.perf_counter() - t0
        if buffer is not None:
            buffer.set_step(step)
        counts = torch.tensor([batch.num_synthetic, batch.real_images.shape[0]], dtype=torch.float64)
        dist.all_reduce(counts)
        n_syn, n_real = int(counts[0]), int(counts[1])
        use_syn = n_syn > 0

        out, logit_scale = _forward_loss(ddp, loss_fn, batch, use_syn, device, tcfg.precision, tcfg.channels_last)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(out["loss"]).backward()
            scaler.unscale_(optimizer)
            clip_gradients(raw_model, tcfg.grad_clip_norm)
            scaler.step(optimizer)
            scaler.update()
        else:
            out["loss"].backward()
            clip_gradients(raw_model, tcfg.grad_clip_norm)
            optimizer.step()
        scheduler.step()
        clamp_logit_scale(raw_model, tcfg.logit_scale_max)
        step += 1
        bar.update(1)
        if keys_file is not None:
            record = {"step": step, "real": batch.real_keys, "syn": batch.syn_keys,
                      "syn_is_synthetic": batch.syn_is_synthetic.tolist(), "used_syn": use_syn}
            keys_file.write(json.dumps(record) + "\n")

        totals["steps_without_syn"] += int(not use_syn)
        totals["syn_samples"] += n_syn
        totals["syn_fallback_samples"] += world * syn_batch - n_syn
        now = time.perf_counter()
        window.steps += 1
        window.time += now - last
        window.wait += t_data
        last = now
        window.images += n_real + (world * syn_batch if use_syn else 0)
        window.real += n_real
        window.syn += n_syn
        window.loss += out["loss"].item()
        window.loss_real += out["loss_real"].item()
        window.loss_syn += out["loss_syn"].item()
        window.syn_steps += int(use_syn)

        if step % cfg.logging.log_every == 0 or step == end:
            losses = torch.tensor([window.loss, window.loss_real, window.loss_syn], dtype=torch.float64)
            dist.all_reduce(losses)
            losses /= world * window.steps
            metrics = {
                "train/loss": losses[0].item(),
                "train/loss_real": losses[1].item(),
                "train/loss_syn": (losses[2].item() * window.steps / window.syn_steps) if window.syn_steps else 0.0,
                "train/logit_scale": logit_scale.item(),
                "train/lr": scheduler.get_last_lr()[0],
                "train/samples_per_s": window.images / max(window.time, 1e-9),
                "train/data_wait_frac": window.wait / max(window.time, 1e-9),
                "train/syn_share_actual": window.syn / max(window.real, 1.0),
                "train/steps_without_syn": totals["steps_without_syn"],
                "train/syn_samples": totals["syn_samples"],
                "train/syn_fallback_samples": totals["syn_fallback_samples"],
                "train/step_time_s": window.time / window.steps,
                **loader.stats(),
            }
            if receiver is not None:
                metrics.update(receiver.stats())
                metrics.update(receiver.producer_stats())
            logger.log(metrics, step=step)
            bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", syn=f"{metrics['train/syn_share_actual']:.2f}")
            window.reset()
            last = time.perf_counter()

        if tcfg.ckpt_every and step % tcfg.ckpt_every == 0 and step < end:
            checkpoint(step)
        if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < tcfg.steps:
            run_eval(step)
            last = time.perf_counter()
    bar.close()

    checkpoint(step)  # always a final model, and what resume=latest continues from
    if step >= tcfg.steps:
        metrics = run_eval(step)
        if rank == 0:
            print("\nzero-shot / linear-probe top-1 after", step, "steps\n" + format_eval_table(metrics), flush=True)
    if receiver is not None:
        receiver.stop()
        buffer.close()
    logger.close()
    if keys_file is not None:
        keys_file.close()
    if rank == 0:
        print(f"[trainer] run folder: {run_dir}", flush=True)


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="config")
def main(dictcfg: DictConfig) -> None:
    try:
        cfg = load_config(dictcfg)
    except ValueError as err:  # a bad value stops here, naming the key
        print(f"config error: {err}", file=sys.stderr, flush=True)
        os._exit(2)
    code = 0
    try:
        train(cfg, OmegaConf.to_container(dictcfg, resolve=True))
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    # DESIGN §8: gloo + torch.distributed.nn.all_gather processes can abort at
    # interpreter exit; ending with os._exit after an orderly shutdown is reliable.
    os._exit(code)


if __name__ == "__main__":
    main()
