"""What a generator config can name, without loading the generator.

:class:`SamplerConfig` and the names it is checked against (timestep spacings, stored
``random:<hub id>`` architectures, precisions) live here, apart from the modules that build a
model, so that reading a config (``edsam_online.config``, every trainer rank, ``edsam_online.preflight``)
never imports diffusers or transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edsam_online.diffusion.transport import MODES
from edsam_online.runtime import PRECISION_DTYPES

RANDOM_PREFIX = "random:"
TINY_RANDOM = "tiny-random"  # a tiny random-weight LDM, built in a moment (tests, smoke runs)
RETRAINED = "retrained"  # the small LDM trained on the built-in world corpus (shipped, or trained once)
#: ``<ARCH_DIR>/<owner>--<name>/``: the stored component configs of hub id ``owner/name``.
ARCH_DIR = Path(__file__).resolve().parent / "arch"


def architectures() -> list[str]:
    """Hub ids whose architecture is stored (what ``random:<hub id>`` accepts)."""
    return sorted(p.name.replace("--", "/", 1) for p in ARCH_DIR.iterdir() if (p / "model_index.json").is_file())


def needs_preparing(model: str) -> bool:
    """Whether ``model`` may need work before the producers load it: ``retrained`` (a recipe
    that does not ship is trained) or a hub id (downloaded into the Hugging Face cache), which
    ``producers.prepare`` does once, so that neither N producers race for it nor the trainers
    wait on a stream still training. ``tiny-random``, a ``random:`` architecture and a local
    folder (checked by the preflight) each producer builds or reads itself."""
    return model == RETRAINED or not (model == TINY_RANDOM or model.startswith(RANDOM_PREFIX)
                                      or Path(model).expanduser().is_dir())


def random_architecture(model: str) -> str | None:
    """The hub id a ``random:<hub id>`` model name builds, or None for any other name.

    Raises ValueError, listing the stored ones, for a ``random:`` name with no stored architecture."""
    if not model.startswith(RANDOM_PREFIX):
        return None
    hub_id = model[len(RANDOM_PREFIX):]
    known = architectures()
    if hub_id not in known:
        raise ValueError(f"no stored architecture for {model!r}; random-weight models: "
                         f"{', '.join(RANDOM_PREFIX + k for k in known)} (configs in {ARCH_DIR})")
    return hub_id


TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")  # DDIMScheduler's


@dataclass
class SamplerConfig:
    """Generator settings. Every default lives here; the groups under ``configs/diffusion/`` override.

    ``model``: a folder or hub id (SD or CompVis LDM layout), ``"tiny-random"`` (random tiny
    LDM, tests), ``"random:<hub id>"`` (a stored published architecture with random weights
    drawn from ``seed``, e.g. ``random:CompVis/ldm-text2im-large-256``: the paper's generator
    for speed measurements, :mod:`edsam_online.diffusion.architectures`) or ``"retrained"``
    (the small LDM trained on the built-in world corpus, cached under ``cache_dir`` and
    trained on first use; ``None``: ``$EDSAM_CACHE`` or ``~/.cache/edsam-online``); see
    :mod:`edsam_online.diffusion.registry`.

    The defaults are the CPU preset of ``"retrained"``: 32 px, M = 4 samples per inversion,
    10 DDIM steps for inversion and sampling with ``leading`` spacing (inversion to t = 901),
    classifier-free guidance 1.5 for sampling and rho 0.75. They are chosen on the world
    model's fidelity frontier alone (``scripts/ldm_fidelity.py``, BENCHMARKS.md), never on an
    evaluation domain: no point of it keeps the class in 90% of samples while 25% leave the
    source style, so the preset is the point with at least 25% off-style samples that keeps
    the most content (:func:`~edsam_online.diffusion.fidelity.fallback_on_frontier`).
    ``timestep_spacing=None`` would use the model's own (the shipped model saves ``trailing``).
    The paper's model (``configs/diffusion/ldm_text2im_256.yaml``) sets the paper's 10 steps,
    guidance 3, rho 0.5 and M = 10.

    ``deepcache_interval`` > 1 (off by default) trades fidelity for speed in sampling
    (:class:`~edsam_online.diffusion.pipeline.LatentDiffusion`): on the shipped model it costs
    little class fidelity at 10 steps and too much at the 5-step preset (BENCHMARKS.md).
    """

    model: str = "retrained"
    cache_dir: str | None = None
    resolution: int = 32
    mode: str = "transport"
    rho: float = 0.75
    m: int = 4
    steps: int = 10
    inversion_steps: int = 10
    guidance: float = 1.5
    timestep_spacing: str | None = "leading"
    batch_size: int = 8
    device: str = "cpu"
    dtype: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    deepcache_interval: int = 1
    deepcache_branch: int = 0
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model: required, got {self.model!r}: a diffusers folder (Stable Diffusion or "
                             f"CompVis LDM layout), a hub id in the local cache, retrained or random:<hub id>")
        try:
            random_architecture(self.model)
        except ValueError as err:
            raise ValueError(f"model: {err}") from None
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not (self.rho >= 0 and np.isfinite(self.rho)):
            raise ValueError(f"rho must be >= 0, got {self.rho}")
        for name in ("m", "steps", "inversion_steps", "batch_size", "resolution"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {self.resolution}")
        if self.timestep_spacing not in (None, *TIMESTEP_SPACINGS):
            raise ValueError(f"timestep_spacing must be null (the model's own) or one of {TIMESTEP_SPACINGS}, "
                             f"got {self.timestep_spacing!r}")
        if not self.guidance >= 1.0:
            raise ValueError(f"guidance must be >= 1 (1 = no guidance), got {self.guidance}")
        if self.dtype not in PRECISION_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(PRECISION_DTYPES)}, got {self.dtype!r}")
        if not (self.device == "cpu" or str(self.device).startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if isinstance(self.deepcache_interval, bool) or int(self.deepcache_interval) < 1:
            raise ValueError(f"deepcache_interval must be >= 1 (1 = off), got {self.deepcache_interval}")
        if int(self.deepcache_branch) < 0:
            raise ValueError(f"deepcache_branch must be >= 0, got {self.deepcache_branch}")
        if self.deepcache_interval > 1 and self.compile:
            raise ValueError("deepcache_interval > 1 does not combine with compile=true")
