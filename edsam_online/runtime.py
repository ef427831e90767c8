"""How a trainer rank runs on its hardware, and the distributed plumbing around it.

One home for what the trainer, the generator and the benchmarks share: the
precision -> autocast dtype table, unwrapping DDP/``torch.compile``, the process
group's start (gloo on CPU, NCCL on GPU, torchrun or a single process) and a
rank's clean ending.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import nn

from edsam_online.validation import require_at_least

#: Precision name -> autocast dtype (``None``: no autocast, plain float32).
PRECISION_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class RuntimeConfig:
    """A trainer rank's device and execution settings (Hydra group ``runtime``).

    ``device``: ``cpu`` (the default, as Hydra's default option ``runtime=cpu``), ``cuda``, or
    ``auto``, which takes CUDA when visible. ``precision`` is the autocast dtype of the
    forward pass (``fp16`` adds a grad scaler). ``threads`` > 0 sets torch's intra-op
    threads (0: torch's default); on a small CPU box shared with a producer, 1 avoids
    oversubscribed OpenMP spinning. ``num_workers`` is the loader's ParallelMapper threads
    per branch, ``prefetch`` the batches it keeps ready.
    """

    device: str = "cpu"
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    threads: int = 0
    num_workers: int = 2
    prefetch: int = 2

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.precision not in PRECISION_DTYPES:
            raise ValueError(f"precision must be one of {tuple(PRECISION_DTYPES)}, got {self.precision!r}")
        require_at_least(self, 1, "num_workers", "prefetch")
        require_at_least(self, 0, "threads")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``precision`` on ``device``, or a no-op for fp32."""
    dtype = PRECISION_DTYPES[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP and ``torch.compile`` wrappers."""
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_distributed(device: str) -> DistInfo:
    """Join (or start) the process group: torchrun's environment when present, else a
    single-process group on a free loopback port. gloo on CPU, NCCL on CUDA."""
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise ValueError("runtime.device: cuda requested but no CUDA device is visible")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if want_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        backend = "nccl" if want_cuda else "gloo"
        if "WORLD_SIZE" in os.environ:  # torchrun
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    torch_device = torch.device("cuda", local_rank) if want_cuda else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, torch_device)


def end_rank(code: int) -> NoReturn:
    """End a trainer rank: on success a barrier and an orderly process-group shutdown, then
    flushed output and ``os._exit(code)``.

    A gloo process that used ``torch.distributed.nn.all_gather`` (what open_clip's
    ``gather_with_grad`` uses) can abort at interpreter exit after its work is done
    ("terminate called without an active exception"); ending this way does not
    (docs/design.md, 'Known pitfalls'). After a failure the other ranks may be gone, so
    no barrier is attempted.
    """
    if dist.is_initialized() and code == 0:
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class StopOnSignal:
    """SIGINT/SIGTERM set ``event`` instead of ending the process, so a loop can stop at
    a point of its choosing (a producer after its message in flight, a trainer after its
    step). Handlers are installed only from the main thread and when ``install``; the
    previous ones come back on :meth:`restore` (or on leaving a ``with`` block)."""

    def __init__(self, event: threading.Event, message: str, install: bool = True) -> None:
        self.event, self.message = event, message
        self._previous: dict[int, Any] = {}
        if install and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.event.is_set():
            print(f"{signal.Signals(signum).name} received: {self.message}", file=sys.stderr, flush=True)
        self.event.set()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self) -> StopOnSignal:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()
