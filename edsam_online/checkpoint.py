"""Atomic training checkpoints and ``resume=latest``.

A checkpoint is written to a temporary file in the same folder, fsynced, then
moved into place with ``os.replace`` (atomic on POSIX), so a crash mid-write
never leaves a truncated ``step_*.pt`` that ``latest`` would pick up. It holds
the model, optimizer, scheduler, grad scaler, step, and every rank's loader
state (gathered by the caller), so a resumed run continues its real-data
stream exactly.
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edsam_online.runtime import unwrap
from edsam_online.validation import require_at_least

_NAME = re.compile(r"^step_(\d+)\.pt$")


@dataclass
class CheckpointConfig:
    """When a trainer writes checkpoints and where it resumes from (Hydra key ``checkpoint``).

    ``every`` > 0 writes one every that many steps; whatever it is, a trainer always writes
    one when it ends (its last step, ``trainer.stop_at``, or SIGTERM/SIGINT). ``keep``: the
    newest that many stay (0 = all). ``resume``: ``""`` (start fresh), ``latest`` (the
    run folder's newest checkpoint, or fresh when there is none) or a checkpoint file.
    """

    every: int = 0
    keep: int = 2
    resume: str = ""

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
    return path


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary files are ignored)."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str, run_dir: str | os.PathLike) -> Path | None:
    """``""`` -> None; ``"latest"`` -> newest checkpoint of ``run_dir`` or None; else a file that must exist."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_file():
        raise ValueError(f"checkpoint.resume: no checkpoint file at {resume!r}")
    return path


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
