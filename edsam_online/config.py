"""The single structured config tree every role reads (DESIGN §5).

``Config`` is registered in Hydra's ConfigStore as ``edsam_config`` and is the
first entry of ``configs/config.yaml``'s defaults list, so every YAML value is
type-checked against it when Hydra composes. :func:`load_config` then builds
the component dataclasses with ``OmegaConf.to_object``, which runs each
``__post_init__``, and re-raises any ``ValueError`` naming the full key
(``diffusion.rho: must be >= 0, got -0.5``): a bad value stops a run at start.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass, field, fields

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from edsam_online.buffer import BufferConfig
from edsam_online.data import RealDataConfig
from edsam_online.diffusion import SamplerConfig
from edsam_online.eval import EvalConfig
from edsam_online.losses import LOSS_KINDS
from edsam_online.metrics import LoggingConfig
from edsam_online.models import ClipModelConfig
from edsam_online.producer import ProducerConfig
from edsam_online.streaming import StreamConfig

MIX_MODES = ("add", "replace")
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TrainerConfig:
    """One trainer rank's training loop (all sizes are per rank).

    ``syn_share`` sets the synthetic batch size relative to ``batch_size``.
    ``mix_mode="add"`` is Eq. 11 as written: ``round(syn_share * batch_size)``
    synthetic samples are *added* to the ``batch_size`` real ones.
    ``mix_mode="replace"`` is the compute-matched ablation: the synthetic part
    replaces that many real samples, so a step sees ``batch_size`` images in all.
    ``syn_wait_s`` is the bounded wait per step for the synthetic part (see
    ``edsam_online.loader`` for what a starved step does). ``steps`` sets the
    schedule's length; ``stop_at`` (0 = off) ends the run early at that step
    with a checkpoint, as a preemption would, so ``resume=latest`` continues it.
    ``ckpt_every`` = 0: only at the end (evaluation cadence is ``eval.every_steps``).
    ``threads`` > 0 sets torch's intra-op threads (0: torch's default); on a small
    CPU box shared with a producer, 1 avoids oversubscribed OpenMP spinning.
    ``record_keys`` writes every step's sample keys to ``<run_dir>/keys/trainer<rank>.jsonl``
    (an audit trail of what each step trained on).
    """

    steps: int = 200
    stop_at: int = 0
    batch_size: int = 32
    syn_share: float = 1.0
    mix_mode: str = "add"
    syn_weight: float = 1.0
    syn_wait_s: float = 0.05
    loss: str = "clip"
    lr: float = 5e-4
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 20
    min_lr_ratio: float = 0.0
    grad_clip_norm: float = 1.0
    logit_scale_max: float = 100.0
    precision: str = "fp32"
    device: str = "auto"
    channels_last: bool = False
    compile: bool = False
    num_workers: int = 2
    prefetch: int = 2
    threads: int = 0
    ckpt_every: int = 0
    keep_checkpoints: int = 2
    resume: str = ""
    progress: bool = True
    record_keys: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "num_workers", "prefetch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("stop_at", "warmup_steps", "ckpt_every", "keep_checkpoints", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.syn_share <= 1.0:
            raise ValueError(f"syn_share must be in [0, 1], got {self.syn_share}")
        if self.mix_mode not in MIX_MODES:
            raise ValueError(f"mix_mode must be one of {MIX_MODES}, got {self.mix_mode!r}")
        if self.mix_mode == "replace" and self.syn_batch_size >= self.batch_size:
            raise ValueError(
                f"syn_share must leave at least one real sample in mix_mode=replace, got {self.syn_share}"
            )
        for name in ("syn_weight", "syn_wait_s", "weight_decay", "grad_clip_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.loss not in LOSS_KINDS:
            raise ValueError(f"loss must be one of {LOSS_KINDS}, got {self.loss!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.logit_scale_max < 1:
            raise ValueError(f"logit_scale_max must be >= 1, got {self.logit_scale_max}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")

    @property
    def syn_batch_size(self) -> int:
        """Synthetic samples per rank per step."""
        return round(self.syn_share * self.batch_size)

    @property
    def real_batch_size(self) -> int:
        """Real samples per rank per step (fewer than ``batch_size`` only in ``replace`` mode)."""
        return self.batch_size - (self.syn_batch_size if self.mix_mode == "replace" else 0)


@dataclass
class Config:
    data: RealDataConfig = field(default_factory=RealDataConfig)
    diffusion: SamplerConfig = field(default_factory=SamplerConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    producer: ProducerConfig = field(default_factory=ProducerConfig)
    model: ClipModelConfig = field(default_factory=ClipModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    seed: int = 0
    run_dir: str = "runs/default"


ConfigStore.instance().store(name="edsam_config", node=Config)

_LEADING_FIELD = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?::\s*|\s+)(.*)$", re.S)


def _with_key(group: str, component_type: type, err: Exception) -> ValueError:
    """``"rho must be >= 0"`` from the ``diffusion`` group -> ``"diffusion.rho: must be >= 0"``."""
    msg = str(err)
    match = _LEADING_FIELD.match(msg)
    names = {f.name for f in fields(component_type)}
    if match and match.group(1) in names:
        return ValueError(f"{group}.{match.group(1)}: {match.group(2)}")
    return ValueError(f"{group}: {msg}")


def _check_cross(cfg: Config) -> None:
    if cfg.trainer.loss == "siglip" and cfg.model.init_logit_bias is None:
        raise ValueError("trainer.loss: siglip needs a model with a logit bias; set model.init_logit_bias (e.g. -10)")


def load_config(dictcfg: DictConfig | dict) -> Config:
    """Typed, validated root config from a Hydra/OmegaConf tree (or a plain dict)."""
    if not isinstance(dictcfg, DictConfig):
        dictcfg = OmegaConf.merge(OmegaConf.structured(Config), dictcfg)
    types = typing.get_type_hints(Config)
    values = {}
    for f in fields(Config):
        node = dictcfg[f.name]
        if not OmegaConf.is_config(node):
            values[f.name] = node
            continue
        try:
            values[f.name] = OmegaConf.to_object(node)
        except ValueError as err:
            raise _with_key(f.name, types[f.name], err) from err
    cfg = Config(**values)
    _check_cross(cfg)
    return cfg
