"""The single structured config tree every role reads (docs/design.md, 'Configuration').

Each component owns a small dataclass beside the code that reads it, and that
dataclass is the one home of its defaults: the YAML options under ``configs/`` hold
only what differs from them. ``Config`` composes the components; it is registered
in Hydra's ConfigStore as ``edsam_config``, the first entry of ``configs/config.yaml``'s
defaults list, so every YAML value is type-checked against it when Hydra composes. :func:`load_config` then builds
the component dataclasses with ``OmegaConf.to_object``, which runs each
``__post_init__``, and re-raises any ``ValueError`` naming the full key
(``diffusion.rho: must be >= 0, got -0.5``): a bad value stops a run at start.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import typing
from dataclasses import dataclass, field, fields
from typing import Callable, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from edsam_online.buffer import BufferConfig
from edsam_online.checkpoint import CheckpointConfig
from edsam_online.data import RealDataConfig
from edsam_online.diffusion.config import SamplerConfig
from edsam_online.eval import EvalConfig
from edsam_online.feedback import FeedbackConfig
from edsam_online.loader import MixConfig
from edsam_online.losses import LossConfig
from edsam_online.methods import MethodConfig
from edsam_online.metrics import LoggingConfig
from edsam_online.models import ClipModelConfig
from edsam_online.optim import OptimConfig
from edsam_online.producer import ProducerConfig
from edsam_online.runtime import RuntimeConfig
from edsam_online.streaming import StreamConfig
from edsam_online.trainer import TrainerConfig


@dataclass
class Config:
    """The root: one field per component, plus the run's seed and folder."""

    data: RealDataConfig = field(default_factory=RealDataConfig)
    diffusion: SamplerConfig = field(default_factory=SamplerConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    producer: ProducerConfig = field(default_factory=ProducerConfig)
    model: ClipModelConfig = field(default_factory=ClipModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    seed: int = 0
    run_dir: str = "runs/default"


ConfigStore.instance().store(name="edsam_config", node=Config)

_LEADING_FIELD = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?::\s*|\s+)(.*)$", re.S)


def _with_key(group: str, component_type: type, err: Exception) -> ValueError:
    """``"rho must be >= 0"`` from the ``diffusion`` group -> ``"diffusion.rho: must be >= 0"``."""
    msg = str(err)
    match = _LEADING_FIELD.match(msg)
    if match:
        key = _field_path(component_type, match.group(1))
        if key:
            return ValueError(f"{group}.{key}: {match.group(2)}")
    return ValueError(f"{group}: {msg}")


def _field_path(component_type: type, name: str) -> str | None:
    """``name`` if it is a field of ``component_type``, else ``<field>.<name>`` for the nested
    dataclass field that holds it (``limits.max_side`` in ``stream``); None if neither."""
    if name in {f.name for f in fields(component_type)}:
        return name
    for f, hint in typing.get_type_hints(component_type).items():
        if dataclasses.is_dataclass(hint) and name in {g.name for g in fields(hint)}:
            return f"{f}.{name}"
    return None


def _derive(cfg: Config) -> None:
    """Settings that one component decides for another: the method decides the generator's
    ``diffusion.mode`` (:data:`edsam_online.methods.GENERATOR_MODES`, its one home). A mode set
    by hand that the method contradicts stops the run. ``producer.policy=adversarial`` needs a
    fidelity scorer: on the built-in data, whose captions the ``attributes`` measurer reads, it
    takes that one unless another is named."""
    if cfg.producer.policy == "adversarial" and cfg.producer.scorer == "none" and cfg.data.kind == "builtin":
        cfg.producer = dataclasses.replace(cfg.producer, scorer="attributes")
    mode = cfg.method.generator_mode
    if mode is None or cfg.diffusion.mode == mode:
        return
    if cfg.diffusion.mode != SamplerConfig.mode:  # set by hand, not the dataclass default
        raise ValueError(f"diffusion.mode: method={cfg.method.name} generates with mode {mode!r}, got "
                         f"{cfg.diffusion.mode!r} (choose the method instead: method=random, method=identity, ...)")
    cfg.diffusion = dataclasses.replace(cfg.diffusion, mode=mode)


def _check_cross(cfg: Config) -> None:
    """Constraints between components, named by the key to change."""
    if cfg.mix.mix_mode == "replace" and cfg.mix.extra_batch_size(cfg.trainer.batch_size) >= cfg.trainer.batch_size:
        raise ValueError(f"mix.extra_share: must leave at least one real sample in mix_mode=replace, "
                         f"got {cfg.mix.extra_share}")
    if cfg.loss.kind == "siglip" and cfg.model.init_logit_bias is None:
        raise ValueError("loss.kind: siglip needs a model with a logit bias; set model.init_logit_bias (e.g. -10)")
    if cfg.producer.policy == "adversarial":
        if cfg.producer.scorer == "none":
            raise ValueError("producer.policy: adversarial needs a fidelity scorer, or it would steer towards samples "
                             "that lost their caption: set producer.scorer=clip (or attributes for built-in captions)")
        if cfg.diffusion.mode != "transport" or cfg.method.extra_batch != "stream":
            raise ValueError(f"producer.policy: adversarial steers the transport of a streaming method "
                             f"(method=edsam), got method={cfg.method.name}")
        if cfg.loss.kind != "clip":
            raise ValueError("producer.policy: adversarial needs loss.kind=clip (the trainers report each "
                             "row's InfoNCE loss)")


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
    _derive(cfg)
    _check_cross(cfg)
    return cfg


T = TypeVar("T")


def or_exit(build: Callable[[], T]) -> T:
    """``build()`` for a process entry point: a bad value (a ``ValueError`` naming its key)
    prints ``config error: <key>: <why>`` to stderr and ends the process with exit code 2."""
    try:
        return build()
    except ValueError as err:
        print(f"config error: {err}", file=sys.stderr, flush=True)
        os._exit(2)  # before any rank or socket exists: nothing to tear down


def load_config_or_exit(dictcfg: DictConfig) -> Config:
    """:func:`load_config` for a process entry point (see :func:`or_exit`)."""
    return or_exit(lambda: load_config(dictcfg))
