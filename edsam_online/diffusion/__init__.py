"""ED-SAM diffusion: transport transformation, latent-diffusion wrapper, sampler."""

from edsam_online.diffusion.transport import MODES, transport

__all__ = ["MODES", "transport"]
