"""ED-SAM diffusion: transport transformation, latent-diffusion wrapper, transport sampler.

Public API: ``transport``, ``LatentDiffusion``, ``load_ldm``, ``build_tiny_ldm``,
``SamplerConfig``, ``EDSAMSampler``, ``GeneratedBatch``, ``build_sampler`` (which loads the
generator ``SamplerConfig.model`` names, see ``registry``).
"""

from edsam_online.diffusion.pipeline import LatentDiffusion, ModelNotAvailableError, build_tiny_ldm, load_ldm
from edsam_online.diffusion.registry import build_sampler
from edsam_online.diffusion.sampler import EDSAMSampler, GeneratedBatch, SamplerConfig
from edsam_online.diffusion.transport import MODES, transport

__all__ = [
    "MODES", "transport", "LatentDiffusion", "ModelNotAvailableError", "build_tiny_ldm", "load_ldm",
    "EDSAMSampler", "GeneratedBatch", "SamplerConfig", "build_sampler",
]
