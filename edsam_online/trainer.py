"""The trainer rank as a library component: :class:`Trainer` with ``train_step`` and ``train``.

A trainer rank owns a CLIP from open_clip under DDP (gloo on CPU, NCCL on GPU), a
local :class:`~edsam_online.buffer.ReplayBuffer` fed by a ZeroMQ
:class:`~edsam_online.streaming.Receiver`, the :class:`~edsam_online.loader.MixedLoader`,
the optimizer and schedule, Eq. 11's loss and its checkpoints. ``train_step(batch)`` is
one Eq. 11 step; ``train()`` runs the loop, logs, evaluates and checkpoints, and always
tears down what it started. ``consumers/train.py`` is the Hydra entry point
(``torchrun -m consumers.train``, the ``edsam-train`` console script).

**Preemption.** While ``train()`` runs, SIGTERM or SIGINT make the rank finish its
current step and stop: every rank's stop request travels in the step's one collective,
so all ranks stop after the same step, write a checkpoint at it, and ``train()`` returns
normally (the process exits 0). ``checkpoint.resume=latest`` continues the run, with the
real-data stream exactly where it stopped.

**Augmentation hook.** A method that changes what a step trains on implements
:class:`edsam_online.methods.Augmentation`: it receives the loader's :class:`~edsam_online.loader.MixedBatch`
and may transform the real part or supply the extra batch (Eq.
11's second term), before the step decides whether that term runs.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import operator
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from edsam_online.allocator import memory_metrics
from edsam_online.buffer import ReplayBuffer
from edsam_online.checkpoint import (buffer_restore_summary, load_checkpoint, restore_buffer_snapshots, resolve_resume,
                                     save_buffer_snapshot, save_checkpoint)
from edsam_online.data.domains import DOMAINS
from edsam_online.data.shapes import render_sample
from edsam_online.eval import LP_PREFIX, ZS_PREFIX, EvalConfig, evaluate, format_eval_table
from edsam_online.ledger import BUFFER_COUNTERS, FINAL_KEY, RESTORED_PREFIX, format_ledger, ledger
from edsam_online.loader import MixedBatch, MixedLoader
from edsam_online.losses import EDSAMLoss
from edsam_online.methods import Augmentation, build_augmentation
from edsam_online.metrics import MetricLogger, Progress, SampleRow
from edsam_online.models import create_clip
from edsam_online.optim import build_optimizer, build_scheduler, clamp_logit_scale, clip_gradients
from edsam_online.runtime import StopOnSignal, autocast, init_distributed
from edsam_online.steering import FeedbackSender
from edsam_online.streaming import Receiver
from edsam_online.validation import require_at_least

if TYPE_CHECKING:  # the root config composes this module's TrainerConfig
    from edsam_online.config import Config

@dataclass
class TrainerConfig:
    """The training loop of one trainer rank (Hydra key ``trainer``; sizes are per rank).

    ``batch_size`` real pairs per step (``mix`` sets the extra part). ``steps`` sets
    the schedule's length; ``stop_at`` (0 = off) ends the run early at that step with a
    checkpoint, as a preemption would, so ``checkpoint.resume=latest`` continues it.
    ``record_keys`` writes every step's sample
    keys to ``<run_dir>/keys/trainer<rank>.jsonl`` (an audit trail of what each step
    trained on). ``progress``: rank 0 shows its progress on stderr, a tqdm bar on a terminal and
    otherwise a line every ``logging.progress_every`` steps. The loss is the root's ``loss``
    (:class:`~edsam_online.losses.LossConfig`).
    """

    steps: int = 200
    stop_at: int = 0
    batch_size: int = 32
    progress: bool = True
    record_keys: bool = False

    def __post_init__(self) -> None:
        require_at_least(self, 1, "steps", "batch_size")
        require_at_least(self, 0, "stop_at")


@dataclass
class StepOutput:
    """What one ``train_step`` did. Losses are this rank's (detached); counts are global."""

    loss: torch.Tensor
    loss_real: torch.Tensor
    loss_extra: torch.Tensor
    logit_scale: torch.Tensor
    num_real: int
    num_genuine: int
    used_extra: bool
    stop_requested: bool  # some rank was asked to stop: every rank stops after this step
    sibling_pairs: int = 0  # pairs of extra-batch rows that share a source key, summed over ranks
    extra_scores: list[float] = dataclasses.field(default_factory=list)  # this rank's trained extra rows' scores
    extra_unscored: int = 0  # this rank's trained extra rows without a score
    extra_alphas: list[float] = dataclasses.field(default_factory=list)  # this rank's trained generated rows' alphas


def _sibling_pairs(batch: MixedBatch) -> int:
    """Pairs of extra-batch pairs in ``batch`` generated from one source image (they share
    its caption, so each is a false negative of the other in that term's InfoNCE)."""
    keys = [k for k, flag in zip(batch.extra_keys, batch.extra_genuine.tolist()) if flag]
    return sum(n * (n - 1) // 2 for n in collections.Counter(keys).values())


def _trained_scores(batch: MixedBatch, used_extra: bool) -> dict[str, Any]:
    """``extra_scores``, ``extra_unscored`` and ``extra_alphas`` of the extra-batch rows a step
    trained on (alphas of generated rows only: others have none)."""
    if not used_extra:
        return {}
    flags = batch.extra_genuine
    alphas = batch.extra_alpha[flags]
    out = {"extra_alphas": alphas[~torch.isnan(alphas)].tolist()}
    if batch.extra_score is None:
        return {**out, "extra_unscored": int(flags.sum())}
    scores = batch.extra_score[flags]
    known = ~torch.isnan(scores)
    return {**out, "extra_scores": scores[known].tolist(), "extra_unscored": int((~known).sum())}


EVAL_TABLE_KEY = "eval/table"  # the W&B table of each evaluation
EVAL_TABLE_COLUMNS = ("set", "zeroshot_top1", "linear_probe_top1", "example")


def eval_table(metrics: dict[str, float], cfg: EvalConfig) -> list[list[Any]]:
    """One row per evaluation set and summary of ``metrics`` (:func:`~edsam_online.eval.evaluate`'s
    output), in their order there, as :data:`EVAL_TABLE_COLUMNS`: its zero-shot and linear-probe
    top-1 (None where not measured) and, for a built-in domain, its first evaluation image."""
    names: dict[str, None] = {}
    for key in metrics:
        for prefix in (ZS_PREFIX, LP_PREFIX):
            if key.startswith(prefix + "/") and key != prefix + "/source":  # "source" repeats the source domain
                names.setdefault(key[len(prefix) + 1:])
    return [[name, metrics.get(f"{ZS_PREFIX}/{name}"), metrics.get(f"{LP_PREFIX}/{name}"),
             render_sample(0, name, cfg.resolution, cfg.seed).image if name in DOMAINS else None] for name in names]


def _normalization(transform: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel mean and std (``[3, 1, 1]``) of the ``Normalize`` in an open_clip
    image transform (mean 0, std 1 if it has none)."""
    from torchvision.transforms import Normalize

    for t in getattr(transform, "transforms", ()):
        if isinstance(t, Normalize):
            return torch.tensor(t.mean).view(-1, 1, 1), torch.tensor(t.std).view(-1, 1, 1)
    return torch.zeros(1, 1, 1), torch.ones(1, 1, 1)


def _finite(value: float) -> float | None:
    """A float32 tensor value as the decimal it stands for (0.45, not 0.44999998807907104); None for NaN."""
    return float(f"{value:.7g}") if math.isfinite(value) else None


def sample_rows(batch: MixedBatch, limit: int, step: int, mean: torch.Tensor, std: torch.Tensor) -> list[SampleRow]:
    """Up to ``limit`` extra-batch rows of ``batch`` flagged ``extra_genuine`` (never a
    starved slot's real fallback), as :class:`~edsam_online.metrics.SampleRow`: the image as
    trained, un-normalised with the transform's ``mean``/``std`` to uint8, its provenance and
    its source's thumbnail where its producer sent one.
    ``step``: the trainer step that trained on them (the age is counted up to it)."""
    index = torch.nonzero(batch.extra_genuine).flatten()[:limit].tolist()
    if not index:
        return []
    images = batch.extra_images[index].detach().float().cpu() * std + mean
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    n = len(batch.extra_keys)

    def known(values: list, i: int) -> Any:
        return values[i] if len(values) == n else None

    rows = []
    for image, i in zip(images, index):
        inserted = known(batch.extra_inserted_steps, i)
        score = None if batch.extra_score is None else _finite(float(batch.extra_score[i]))
        rows.append(SampleRow(image=image, caption=known(batch.extra_captions, i) or "",
                              alpha=_finite(float(batch.extra_alpha[i])), producer=known(batch.extra_producers, i),
                              age_steps=None if inserted is None else step - inserted,
                              source_key=batch.extra_keys[i], score=score,
                              source_image=known(batch.extra_source_thumbs, i)))
    return rows


class _Window:
    """Sums over the steps since the last log line."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.steps = self.extra_steps = 0
        self.time = self.wait = 0.0
        self.images = self.real = self.genuine = 0.0
        self.loss = self.loss_real = self.loss_extra = 0.0
        self.sibling_pairs = 0
        self.scores: list[float] = []
        self.alphas: list[float] = []
        self.unscored = 0

    def add(self, out: StepOutput, images: int, seconds: float, wait: float) -> None:
        self.steps += 1
        self.extra_steps += int(out.used_extra)
        self.time += seconds
        self.wait += wait
        self.images += images
        self.real += out.num_real
        self.genuine += out.num_genuine
        self.loss += out.loss.item()
        self.loss_real += out.loss_real.item()
        self.loss_extra += out.loss_extra.item()
        self.sibling_pairs += out.sibling_pairs
        self.scores += out.extra_scores
        self.alphas += out.extra_alphas
        self.unscored += out.extra_unscored

    def score_metrics(self) -> dict[str, float]:
        """``buffer/score_*``: the fidelity scores of the synthetic rows this rank trained on
        (nothing while no row had one, e.g. without a producer scorer or for masking/ADA)."""
        if not self.scores:
            return {}
        scores = np.asarray(self.scores)
        return {"buffer/score_missing_share": self.unscored / (len(scores) + self.unscored),
                "buffer/score_mean": float(scores.mean()),
                **{f"buffer/score_p{q}": float(np.percentile(scores, q)) for q in (10, 50, 90)}}


    def alpha_metrics(self, rho: float, bins: int) -> dict[str, float]:
        """``train/alpha_hist/<bin>``: the share of the generated rows this rank trained on whose
        alpha lies in each of ``bins`` equal bins over ``[-rho, rho]`` (nothing without any)."""
        if not self.alphas or rho <= 0:
            return {}
        counts, _ = np.histogram(np.clip(self.alphas, -rho, rho), bins=bins, range=(-rho, rho))
        return {f"train/alpha_hist/{k:02d}": float(c) / len(self.alphas) for k, c in enumerate(counts)}


class Trainer:
    """One trainer rank, built from the root config (``cfg``: an :class:`edsam_online.config.Config`;
    not imported here, since that module composes this one's ``TrainerConfig``).

    ``resolved`` (the resolved config as a plain dict) goes to W&B as the run config. Rank 0
    logs a few of the extra-batch rows a step trained on every ``logging.sample_every``
    steps and at ``end``, the step the run stops after (:func:`sample_rows`).
    ``augmentation`` is the method's hook (:class:`Augmentation`; default: the one
    ``cfg.method`` names, :func:`~edsam_online.methods.build_augmentation`). ``extra_batch``
    is the extra batch's size (0 for ``method=none``); the buffer and receiver exist only
    for methods whose extra batch streams from producers. ``close()`` (also run by ``train()`` and
    ``with Trainer(...)``) stops the receiver and closes the logger and files; it leaves
    the process group to the caller (:func:`edsam_online.runtime.end_rank`).
    """

    def __init__(self, cfg: Config, resolved: dict | None = None, augmentation: Augmentation | None = None):
        self.cfg = cfg
        rt, tcfg = cfg.runtime, cfg.trainer
        dist_info = init_distributed(rt.device)
        self.rank, self.world, self.device = dist_info.rank, dist_info.world_size, dist_info.device
        self.run_dir = self._shared_run_dir(cfg.run_dir)
        if rt.threads > 0:
            torch.set_num_threads(rt.threads)
        torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's)

        model, preprocess_train, self.preprocess_val, self.tokenizer = create_clip(cfg.model, str(self.device))
        self._pixel_mean, self._pixel_std = _normalization(preprocess_train)  # to log samples as trained
        if rt.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model  # the bare module: optimizer, clamp, checkpoints and evaluation use it
        self.ddp = DDP(torch.compile(model) if rt.compile else model,
                       device_ids=[dist_info.local_rank] if self.device.type == "cuda" else None)

        extra = cfg.method.extra_batch
        self.extra_batch = cfg.mix.extra_batch_size(tcfg.batch_size) if extra != "none" else 0
        self.real_batch = cfg.mix.real_batch_size(tcfg.batch_size) if extra != "none" else tcfg.batch_size
        self.augmentation = augmentation or build_augmentation(cfg.method, model, cfg.seed + self.rank)
        self.optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, tcfg.steps)
        self.scaler = torch.amp.GradScaler(self.device.type) if rt.precision == "fp16" else None
        self.loss_fn = EDSAMLoss(cfg.loss, self.rank, self.world)
        self.step = 0
        self.end = min(tcfg.stop_at or tcfg.steps, tcfg.steps)  # the step this run stops after
        self.totals = {"steps_without_extra": 0, "extra_samples": 0, "extra_fallback_samples": 0}
        self.buffer: ReplayBuffer | None = None
        self.receiver: Receiver | None = None
        self.feedback: FeedbackSender | None = None  # opened by the first sample whose producer asks for feedback
        self.keys_file = None
        self._restored_counts: dict[str, float] = {}
        with contextlib.ExitStack() as stack:  # on a failure below, what was started is stopped
            if self.extra_batch > 0 and extra == "stream":
                self.buffer = ReplayBuffer(dataclasses.replace(cfg.buffer, seed=cfg.buffer.seed + self.rank),
                                           key=operator.attrgetter("source_key"))
                stack.callback(self.buffer.close)
                self.receiver = Receiver(cfg.stream, self.buffer, rank=self.rank).start()
                stack.callback(self.receiver.stop)
            self.loader = MixedLoader(
                cfg.data, preprocess_train, self.tokenizer, real_batch=self.real_batch,
                extra_batch=self.extra_batch if extra != "augment" else 0,  # "augment": the hook makes it
                buffer=self.buffer, mix=cfg.mix, runtime=rt, rank=self.rank, world_size=self.world,
                extra=extra if extra in ("real", "shards") else "stream",
                distinct_sources=cfg.buffer.distinct_sources, shards=cfg.method.offline_shards,
            )
            self._resume()
            self.logger = MetricLogger(cfg.logging, self.run_dir, "trainer", self.rank, config=resolved)
            stack.callback(self.logger.close)
            if tcfg.record_keys:
                (Path(self.run_dir) / "keys").mkdir(parents=True, exist_ok=True)
                self.keys_file = open(Path(self.run_dir) / "keys" / f"trainer{self.rank}.jsonl", "a", buffering=1,
                                      encoding="utf-8")
                stack.callback(self.keys_file.close)
            self._teardown = stack.pop_all()

    # ------------------------------------------------------------------ setup

    def _shared_run_dir(self, run_dir: str) -> str:
        """Every rank uses rank 0's run_dir (``${now:...}`` may differ across ranks)."""
        holder = [os.path.abspath(run_dir)]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def _resume(self) -> None:
        ckpt = resolve_resume(self.cfg.checkpoint.resume, self.run_dir)
        if ckpt is None:
            return
        state = load_checkpoint(ckpt, self.model, self.optimizer, self.scheduler, self.scaler)
        self.step = state["step"]
        self.totals.update(state["extra"].get("totals", {}))
        loader_states = state["loader_states"] or []
        if len(loader_states) == self.world:
            self.loader.load_state_dict(loader_states[self.rank])
        elif self.rank == 0:
            print(f"[trainer] checkpoint has {len(loader_states)} loader states for world size {self.world}: "
                  "the real-data stream restarts", file=sys.stderr)
        if self.cfg.checkpoint.buffer and self.buffer is not None:
            self._restore_buffer(ckpt)
        if self.rank == 0:
            print(f"[trainer] resumed from {ckpt} at step {self.step}", file=sys.stderr)

    def _restore_buffer(self, ckpt: Path) -> None:
        """Refill this rank's buffer from the snapshots beside ``ckpt`` (under its lock: the
        receiver may already be inserting); rank 0 says what came back on all ranks."""
        found, restored, dropped = restore_buffer_snapshots(ckpt, self.buffer, self.rank, self.world,
                                                            self.cfg.stream.limits)
        self._restored_counts = {RESTORED_PREFIX + key: self.buffer.restored_counters[key.removeprefix("buffer/")]
                                 for key in BUFFER_COUNTERS.values()}
        counts = [None] * self.world
        dist.all_gather_object(counts, (restored, dropped))
        if self.rank == 0:
            total_restored, total_dropped = (sum(c) for c in zip(*counts))
            print(f"[trainer] {buffer_restore_summary(ckpt, found, self.world, total_restored, total_dropped)}",
                  file=sys.stderr)

    # ------------------------------------------------------------------ one step

    def forward_loss(self, batch: MixedBatch, use_extra: bool,
                     row_losses: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Eq. 11 on ``batch`` (the extra term only if ``use_extra``): the loss dict of
        :class:`~edsam_online.losses.EDSAMLoss` and the logit scale. Both terms go through
        the model in one forward pass; each is contrastive within its own rows. ``row_losses``:
        the dict also holds each extra row's own loss (``extra_row_loss``)."""
        rt = self.cfg.runtime
        real_n = batch.real_images.shape[0]
        images, texts = batch.real_images, batch.real_texts
        if use_extra:
            images = torch.cat([images, batch.extra_images])
            texts = torch.cat([texts, batch.extra_texts])
        images = images.to(self.device, non_blocking=True)
        texts = texts.to(self.device, non_blocking=True)
        if rt.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, rt.precision):
            out = self.ddp(images, texts)
        image_f, text_f, logit_scale = out[0].float(), out[1].float(), out[2].float()
        losses = self.loss_fn(
            image_f[:real_n],
            text_f[:real_n],
            logit_scale,
            image_f[real_n:] if use_extra else None,
            text_f[real_n:] if use_extra else None,
            logit_bias=out[3].float() if len(out) > 3 else None,
            use_extra=use_extra,
            extra_weights=self._extra_weights(batch) if use_extra else None,
            row_losses=row_losses,
        )
        return losses, logit_scale

    def _extra_weights(self, batch: MixedBatch) -> torch.Tensor | None:
        """Per extra row, its score as the weight (``loss.extra_weighting=score``; 1 without a score)."""
        if self.cfg.loss.extra_weighting != "score":
            return None
        n = batch.extra_images.shape[0]
        if batch.extra_score is None:
            return torch.ones(n, device=self.device)
        return torch.nan_to_num(batch.extra_score, nan=1.0).to(self.device)

    def train_step(self, batch: MixedBatch, stop_requested: bool = False) -> StepOutput:
        """One optimizer step of Eq. 11 on this rank's ``batch`` (a collective: every rank calls it).

        The ranks agree, in one all-reduce, on the global real and genuine extra counts
        and on whether any rank asked to stop (``stop_requested``). A step whose global
        extra batch holds no genuine pair (a starved slot's fallbacks only) trains on the
        real term alone. On a
        sample-logging step rank 0 also logs the batch's rows as trained. The gradients are freed
        as soon as the optimizer has used them, not at the next step's start, so they are not held
        through the next batch and forward: peak memory is lower by their size.
        """
        optim = self.cfg.optim
        batch = self.augmentation(batch, self)
        if self.buffer is not None:
            self.buffer.set_step(self.step)
        agreed = torch.tensor([batch.num_genuine, batch.real_images.shape[0], float(stop_requested),
                               _sibling_pairs(batch)], dtype=torch.float64)
        dist.all_reduce(agreed)
        n_extra, n_real, stops, siblings = (int(v) for v in agreed.tolist())
        use_extra = n_extra > 0
        reports = use_extra and any(o is not None for o in batch.extra_origins)
        losses, logit_scale = self.forward_loss(batch, use_extra, row_losses=reports)
        if self.scaler is not None:
            self.scaler.scale(losses["loss"]).backward()
            self.scaler.unscale_(self.optimizer)
            clip_gradients(self.model, optim.grad_clip_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            losses["loss"].backward()
            clip_gradients(self.model, optim.grad_clip_norm)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        clamp_logit_scale(self.model, optim.logit_scale_max)
        if reports:
            self._report(batch, losses["extra_row_loss"])
        self.step += 1
        if self.feedback is not None and self.step % self.cfg.feedback.every_steps == 0:
            self.feedback.flush(self.step)
        self.totals["steps_without_extra"] += int(not use_extra)
        self.totals["extra_samples"] += n_extra
        self.totals["extra_fallback_samples"] += self.world * self.extra_batch - n_extra
        if self.keys_file is not None:
            record = {"step": self.step, "real": batch.real_keys, "extra": batch.extra_keys,
                      "extra_genuine": batch.extra_genuine.tolist(), "used_extra": use_extra}
            self.keys_file.write(json.dumps(record) + "\n")
        if self.rank == 0 and self._samples_due():
            rows = sample_rows(batch, self.cfg.logging.sample_rows, self.step - 1, self._pixel_mean, self._pixel_std)
            self.logger.log_samples(rows, step=self.step)
        return StepOutput(
            loss=losses["loss"].detach(), loss_real=losses["loss_real"].detach(),
            loss_extra=losses["loss_extra"].detach(), logit_scale=logit_scale.detach(),
            num_real=n_real, num_genuine=n_extra, used_extra=use_extra, stop_requested=stops > 0,
            sibling_pairs=siblings, **_trained_scores(batch, use_extra),
        )

    def _report(self, batch: MixedBatch, row_loss: torch.Tensor) -> None:
        """Queue each generated row's own loss (measured by the model at this step) for the
        producer that made it, where that producer asked for feedback (:mod:`edsam_online.steering`)."""
        if self.feedback is None:
            stream = self.cfg.stream
            curve = (stream.curve_server_secret, stream.curve_allow_dir) if stream.curve else None
            self.feedback = FeedbackSender(f"trainer-{self.rank}", self.cfg.feedback, curve)
        genuine = batch.extra_genuine.tolist()
        for origin, loss, real in zip(batch.extra_origins, row_loss.tolist(), genuine):
            if origin is not None and real:
                self.feedback.add(origin.feedback, origin.session, origin.seq, loss, self.step)

    def _samples_due(self) -> bool:
        """Whether the step just done logs samples: every ``logging.sample_every`` steps and
        the run's last (the conversion to images runs only then)."""
        every = self.cfg.logging.sample_every
        return every > 0 and (self.step % every == 0 or self.step == self.end)

    # ------------------------------------------------------------------ the loop

    def save(self) -> Path | None:
        """A checkpoint at the current step (a collective: every rank's loader state goes in, and
        with ``checkpoint.buffer`` every rank's buffer beside it); returns its file on rank 0 (None elsewhere)."""
        if self.cfg.checkpoint.buffer and self.buffer is not None:
            save_buffer_snapshot(self.run_dir, self.step, self.rank, self.buffer)  # before the gather: see its doc
        states = [None] * self.world
        dist.all_gather_object(states, self.loader.state_dict())
        path = None
        if self.rank == 0:
            path = save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self.scheduler, self.scaler,
                                   states, extra={"totals": self.totals}, keep_last=self.cfg.checkpoint.keep)
        dist.barrier()
        return path

    def evaluate(self) -> dict[str, float]:
        """Zero-shot and linear-probe metrics on rank 0 (logged, and as the W&B table
        ``eval/table``: :func:`eval_table`; ``{}`` on other ranks)."""
        metrics = {}
        if self.rank == 0:
            metrics = evaluate(self.model, self.tokenizer, self.preprocess_val, self.cfg.eval, device=str(self.device))
            self.logger.log(metrics, step=self.step)
            self.logger.log_table(EVAL_TABLE_KEY, list(EVAL_TABLE_COLUMNS), eval_table(metrics, self.cfg.eval),
                                  step=self.step)
        dist.barrier()
        return metrics

    def _log(self, window: _Window, out: StepOutput) -> dict[str, Any]:
        losses = torch.tensor([window.loss, window.loss_real, window.loss_extra], dtype=torch.float64)
        dist.all_reduce(losses)
        losses /= self.world * window.steps
        span = max(window.time, 1e-9)
        metrics = {
            "train/loss": losses[0].item(),
            "train/loss_real": losses[1].item(),
            "train/loss_extra": (losses[2].item() * window.steps / window.extra_steps) if window.extra_steps else 0.0,
            "train/logit_scale": out.logit_scale.item(),
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/samples_per_s": window.images / span,
            "train/data_wait_frac": window.wait / span,
            "train/extra_share_actual": window.genuine / max(window.real, 1.0),
            "train/extra_sibling_pairs": window.sibling_pairs / window.steps,
            **{f"train/{name}": value for name, value in self.totals.items()},
            "train/step_time_s": window.time / window.steps,
            **self.loader.stats(),
            **window.score_metrics(),
            **window.alpha_metrics(self.cfg.diffusion.rho, self.cfg.producer.adversarial.bins),
            **memory_metrics(),
        }
        if self.feedback is not None:
            metrics.update(self.feedback.metrics())
        metrics.update(self._restored_counts)  # the first record after a buffer restore (the ledger's baseline)
        self._restored_counts = {}
        if self.receiver is not None:
            metrics.update(self.receiver.stats())
            metrics.update({"producer/sent": 0.0, **self.receiver.producer_stats()})  # producer/*'s W&B x axis
        self.logger.log(metrics, step=self.step)
        return metrics

    def train(self) -> dict[str, float]:
        """Train to ``trainer.steps`` (or ``stop_at``, the end of a finite data set, or a stop signal), write
        the final checkpoint, evaluate after the last step, log the final counts (:meth:`_log_ledger`) and
        tear down. Returns the final evaluation metrics (``{}`` when it stopped early or on ranks other than 0)."""
        tcfg, cfg = self.cfg.trainer, self.cfg
        end = self.end
        metrics: dict[str, float] = {}
        try:
            message = "the trainer finishes its step, then writes a checkpoint"
            with StopOnSignal(threading.Event(), message) as stop:
                progress = Progress(end, self.step, cfg.logging.progress_every,
                                    enabled=self.rank == 0 and tcfg.progress)
                self._teardown.callback(progress.close)
                window = _Window()
                data_iter = iter(self.loader)
                self.ddp.train()
                last = time.perf_counter()
                while self.step < end:
                    t0 = time.perf_counter()
                    try:
                        batch = next(data_iter)
                    except StopIteration:  # a finite data.epochs ran out
                        break
                    t_data = time.perf_counter() - t0
                    out = self.train_step(batch, stop.event.is_set())
                    now = time.perf_counter()
                    window.add(out, out.num_real + (self.world * self.extra_batch if out.used_extra else 0), now - last,
                               t_data)
                    last = now
                    logged = None
                    if self.step % cfg.logging.log_every == 0 or self.step == end or out.stop_requested:
                        logged = self._log(window, out)
                        window.reset()
                        last = time.perf_counter()
                    progress.update(self.step, logged)
                    if out.stop_requested:
                        break
                    if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < end:
                        self.save()
                    if cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0 and self.step < tcfg.steps:
                        self.evaluate()
                        last = time.perf_counter()
                progress.close()
                final = self.save()  # always a final model, and what resume=latest continues from
                if final is not None and cfg.logging.wandb_checkpoint:
                    self.logger.log_checkpoint(final, self.step)
                if self.step >= tcfg.steps:
                    metrics = self.evaluate()
                    if self.rank == 0:
                        print(f"\nzero-shot / linear-probe top-1 after {self.step} steps\n"
                              + format_eval_table(metrics), flush=True)
                else:
                    print(f"[trainer] rank {self.rank} stopped at step {self.step} of {tcfg.steps}; "
                          "checkpoint.resume=latest continues it", file=sys.stderr, flush=True)
                self._log_ledger()
        finally:
            self.close()
        if self.rank == 0:
            print(f"[trainer] run folder: {self.run_dir}", flush=True)
        return metrics

    def _log_ledger(self) -> None:
        """The rank's final counts (:mod:`edsam_online.ledger`): the receiver stops (counting what is
        still queued as in flight), the buffer closes (no more draws) and the record is marked
        final; then rank 0 prints the run's ledger, over every rank and producer, or, while a
        producer is still running, where it will be."""
        if self.receiver is None:
            return
        self.receiver.stop()
        self.buffer.close()
        self.logger.log({**self.receiver.stats(), FINAL_KEY: 1}, step=self.step)
        dist.barrier()
        if self.rank == 0 and self.logger.path is not None:
            book = ledger(self.run_dir)
            running = f"{', '.join(book.running)} {'end' if book.running[1:] else 'ends'}"
            print(format_ledger(book) if not book.running else f"sample ledger: complete once {running} (launch.sh "
                  f"prints it then; python -m edsam_online.ledger {self.run_dir})", flush=True)

    def close(self) -> None:
        """Stop the receiver, close the buffer, the feedback sockets, the logger and the keys
        file (idempotent)."""
        self._teardown.close()
        if self.feedback is not None:
            self.feedback.close()
            self.feedback = None

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
