"""Atomic training checkpoints and ``resume=latest``.

A checkpoint is written to a temporary file in the same folder, fsynced, then
moved into place with ``os.replace`` (atomic on POSIX), so a crash mid-write
never leaves a truncated ``step_*.pt`` that ``latest`` would pick up. It holds
the model, optimizer, scheduler, grad scaler, step, and every rank's loader
state (gathered by the caller), so a resumed run continues its real-data
stream exactly.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edsam_online.buffer import ReplayBuffer
from edsam_online.buffer_snapshot import read_snapshot, write_snapshot
from edsam_online.runtime import unwrap
from edsam_online.wire import WireLimits
from edsam_online.validation import require_at_least

_NAME = re.compile(r"^step_(\d+)\.pt$")
_BUFFER_NAME = re.compile(r"^step_(\d+)\.buffer(\d+)\.npz$")


@dataclass
class CheckpointConfig:
    """When a trainer writes checkpoints and where it resumes from (Hydra key ``checkpoint``).

    ``every`` > 0 writes one every that many steps; whatever it is, a trainer always writes
    one when it ends (its last step, ``trainer.stop_at``, or SIGTERM/SIGINT). ``keep``: the
    newest that many stay (0 = all). ``resume``: ``""`` (start fresh), ``latest`` (the
    run folder's newest checkpoint that loads, or fresh when there is none) or a checkpoint file.
    ``buffer``: every rank also saves its replay buffer beside each checkpoint, and a resumed
    rank starts with it (:func:`save_buffer_snapshot`, :func:`restore_buffer_snapshots`).
    """

    every: int = 0
    keep: int = 2
    resume: str = ""
    buffer: bool = False

    def __post_init__(self) -> None:
        require_at_least(self, 0, "every", "keep")


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    loader_states: list[dict] | None,
    extra: dict | None = None,
    keep_last: int = 2,
) -> Path:
    """Write ``<run_dir>/checkpoints/step_<step>.pt`` atomically; keep the newest ``keep_last``."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:08d}.pt"
    tmp = folder / f".{path.name}.tmp{os.getpid()}"
    state = {
        "step": step,
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "loader_states": loader_states,
        "extra": extra or {},
    }
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            old.unlink(missing_ok=True)
        prune_buffer_snapshots(run_dir)
    return path


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary files are ignored)."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str, run_dir: str | os.PathLike) -> Path | None:
    """``""`` -> None; ``"latest"`` -> the newest checkpoint of ``run_dir`` that loads, or None
    when it has none; else a file that must exist and load.

    With ``latest``, newer files that do not load (truncated, garbage) are skipped, each with a
    warning naming it, and renamed ``<name>.unreadable`` once an older one loads: the run
    continues from that one, and pruning to the newest ``keep`` never counts them.
    """
    if not resume:
        return None
    if resume != "latest":
        path = Path(resume)
        if not path.is_file():
            raise ValueError(f"checkpoint.resume: no checkpoint file at {resume!r}")
        if (reason := _unreadable(path)) is not None:
            raise ValueError(f"checkpoint.resume: {resume!r} does not load ({reason})")
        return path
    found, skipped = list_checkpoints(run_dir), []
    for path in reversed(found):
        reason = _unreadable(path)
        if reason is None:
            for bad in skipped:
                with contextlib.suppress(OSError):  # another rank may have renamed it first
                    bad.rename(bad.with_name(bad.name + ".unreadable"))
            return path
        warnings.warn(f"checkpoint.resume=latest: skipping {path}, which does not load ({reason}); "
                      "trying the one before", stacklevel=2)
        skipped.append(path)
    if skipped:
        raise ValueError(f"checkpoint.resume=latest: none of the {len(found)} checkpoints in "
                         f"{checkpoint_dir(run_dir)} loads")
    return None


def _unreadable(path: Path) -> str | None:
    """Why ``path`` does not load as a checkpoint, or None when it does. Memory-mapped, so the
    check reads the file's structure and state dicts, not its tensors."""
    if not zipfile.is_zipfile(path):  # what torch.save writes; cut short, it has lost its directory
        return "not a complete zip archive: truncated or garbage"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # a truncated zip, garbage, a refused object: each means "not this file"
        return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
    if not isinstance(state, dict) or not {"step", "model"} <= state.keys():
        return "not a training checkpoint: no step or model"
    return None


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, Any]:
    """Restore the given objects in place; returns ``{"step", "loader_states", "extra"}``.

    Loaded with ``weights_only=True``: nothing in a checkpoint is unpickled as code (the
    loader states are plain dicts, lists, numbers and strings), so a file that smuggles
    in an arbitrary object is refused with ``ValueError`` rather than run.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path}: not a plain checkpoint (it holds objects weights_only loading refuses): "
                         f"{str(err).splitlines()[0]}") from None
    unwrap(model).load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    return {"step": state["step"], "loader_states": state["loader_states"], "extra": state["extra"]}


# ----------------------------------------------------------------------------- buffer snapshots


def buffer_snapshot_path(checkpoint: str | os.PathLike, rank: int) -> Path:
    """Trainer rank ``rank``'s buffer snapshot beside ``checkpoint``: ``step_<step>.buffer<rank>.npz``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.buffer{rank}.npz")


def buffer_snapshots(checkpoint: str | os.PathLike) -> dict[int, Path]:
    """The buffer snapshots beside ``checkpoint``, by the rank that wrote them, in rank order."""
    checkpoint = Path(checkpoint)
    if not checkpoint.parent.is_dir():
        return {}
    found = {int(m.group(2)): p for p in checkpoint.parent.glob(f"{checkpoint.stem}.buffer*.npz")
             if (m := _BUFFER_NAME.match(p.name))}
    return dict(sorted(found.items()))


def save_buffer_snapshot(run_dir: str | os.PathLike, step: int, rank: int, buffer: ReplayBuffer) -> Path:
    """Write rank ``rank``'s ``buffer`` beside the checkpoint of ``step`` atomically, as
    :func:`save_checkpoint` writes that (every rank writes its own before rank 0 writes the
    checkpoint, so a checkpoint that exists has its snapshots; :mod:`edsam_online.buffer_snapshot`)."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = buffer_snapshot_path(folder / f"step_{step:08d}.pt", rank)
    tmp = folder / f".{path.name}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write_snapshot(f, buffer.snapshot())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def prune_buffer_snapshots(run_dir: str | os.PathLike) -> None:
    """Delete the buffer snapshots older than the run's oldest checkpoint (theirs was pruned)."""
    kept = list_checkpoints(run_dir)
    if not kept:
        return
    oldest = int(_NAME.match(kept[0].name).group(1))
    for path in checkpoint_dir(run_dir).glob("step_*.buffer*.npz"):
        if (m := _BUFFER_NAME.match(path.name)) and int(m.group(1)) < oldest:
            path.unlink(missing_ok=True)


def restore_buffer_snapshots(checkpoint: str | os.PathLike, buffer: ReplayBuffer, rank: int, world: int,
                             limits: WireLimits) -> tuple[int, int, int]:
    """Refill trainer rank ``rank`` of ``world``'s ``buffer`` from the snapshots beside
    ``checkpoint``: of those found, in rank order, it takes the ``rank``-th, then every
    ``world``-th after it (its own alone when the world size is unchanged; with fewer ranks than
    snapshots, several each; with more, the extra ranks start empty). The first restores the
    sampling RNG too; each later one goes before (older than) what is already restored, and
    what does not fit ``buffer.capacity`` is dropped, oldest first. A file that does not read
    as a snapshot (``limits``: what the receiver accepts) is skipped with a warning naming it.
    Returns (snapshots found, items restored, items dropped)."""
    found = buffer_snapshots(checkpoint)
    restored = dropped = 0
    for i, path in enumerate(list(found.values())[rank::world]):
        try:
            snap = read_snapshot(path, limits)
        except ValueError as err:
            warnings.warn(f"checkpoint.buffer: skipping the buffer snapshot {path}: {err}", stacklevel=2)
            continue
        if i > 0:
            snap.rng_state = None
        lost = buffer.restore(snap)
        restored += len(snap) - lost
        dropped += lost
    return len(found), restored, dropped


def buffer_restore_summary(checkpoint: str | os.PathLike, found: int, world: int, restored: int,
                           dropped: int) -> str:
    """One line on what :func:`restore_buffer_snapshots` did on all ``world`` ranks (``restored``
    and ``dropped`` summed over them)."""
    if found == 0:
        return f"checkpoint.buffer: no buffer snapshot beside {checkpoint}: the buffers start empty"
    how = ("one per rank" if found == world else
           f"redistributed: rank r takes snapshots r, r+{world}, ..." if found > world else
           f"ranks 0 to {found - 1} take one each, ranks {found} to {world - 1} start empty")
    return (f"checkpoint.buffer: {found} buffer snapshots, {world} trainer ranks now ({how}): "
            f"{restored} items restored, {dropped} dropped (over buffer.capacity)")
