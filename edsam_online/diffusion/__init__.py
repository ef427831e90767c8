"""ED-SAM diffusion: transport transformation, latent-diffusion wrapper, transport sampler.

Public API: ``transport``, ``LatentDiffusion``, ``load_ldm``, ``build_tiny_ldm``,
``SamplerConfig``, ``EDSAMSampler``, ``GeneratedBatch``, ``build_sampler`` (which loads the
generator ``SamplerConfig.model`` names, see ``registry``).

The names that need diffusers are imported on first use (PEP 562), so that importing a light
submodule such as :mod:`edsam_online.diffusion.config` does not load diffusers and
transformers. ``transport`` (torch only) is imported here: the function shares its
submodule's name, and the package attribute must be the function.
"""

import importlib

from edsam_online.diffusion.transport import MODES, transport

_HOMES = {
    "LatentDiffusion": "pipeline", "ModelNotAvailableError": "pipeline", "build_tiny_ldm": "pipeline",
    "load_ldm": "pipeline",
    "EDSAMSampler": "sampler", "GeneratedBatch": "sampler",
    "SamplerConfig": "config",
    "build_sampler": "registry",
}
__all__ = ["MODES", "transport", *_HOMES]


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)


def __dir__():
    return sorted(list(globals()) + __all__)
