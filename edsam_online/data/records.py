"""The two sample types every data path shares.

`RealRecord` is what a data node yields: the image still *encoded* (file bytes) or,
for built-in data, an already rendered array; decoding happens later (in a mapper
or a producer) so a node stays cheap and its state stays exact.
`RealSample` is a decoded sample: a uint8 HxWx3 RGB array ready for models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class RealRecord:
    key: str
    image: bytes | np.ndarray
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class RealSample:
    key: str
    image: np.ndarray  # uint8, HxWx3, RGB
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)
