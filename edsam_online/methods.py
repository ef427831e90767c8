"""What fills the second term of Eq. 11: the method a run compares (Hydra group ``method``).

Every method trains on the same real batch (``trainer.batch_size``) with the same loss;
those with an extra batch give it the same size (``mix.syn_share``) and its own
contrastive term, so methods are compared at the same images per step:

============  ===============================================================  =========
``none``      real pairs only, one term                                        no extra
``real2x``    a second, disjoint stream of real pairs: the compute-matched     real
              control (as many images per step as ED-SAM, none generated)
``edsam``     ED-SAM's transport samples (Eq. 9) from the replay buffer        producer
``random``    the paper's Table 3 ablation, ``z_t ~ N(rho, I)``                producer
``identity``  alpha = 0: a reconstruction through the same LDM, which          producer
              separates the generator's own artefacts from the shift
============  ===============================================================  =========

A method with a producer sets the generator's ``diffusion.mode``; the config check
refuses a run whose ``diffusion.mode`` disagrees with its method.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Method name -> the generator's ``diffusion.mode`` (None: the method runs no producer).
GENERATOR_MODES: dict[str, str | None] = {
    "none": None,
    "real2x": None,
    "edsam": "transport",
    "random": "random",
    "identity": "identity",
}


@dataclass
class MethodConfig:
    """Which method fills Eq. 11's second term (the module docstring lists them)."""

    name: str = "edsam"

    def __post_init__(self) -> None:
        if self.name not in GENERATOR_MODES:
            raise ValueError(f"name must be one of {tuple(GENERATOR_MODES)}, got {self.name!r}")

    @property
    def generator_mode(self) -> str | None:
        """The ``diffusion.mode`` its producers generate with (None: it needs no producer)."""
        return GENERATOR_MODES[self.name]

    @property
    def extra_batch(self) -> str:
        """Where the second term's pairs come from: ``"none"``, ``"real"`` or ``"stream"``."""
        if self.name == "none":
            return "none"
        return "stream" if self.generator_mode is not None else "real"
