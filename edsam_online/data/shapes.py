"""Procedural shapes: the built-in image-caption data, deterministic by (seed, domain, index).

Ten classes of large, simple shapes, so they stay distinguishable at 32 px, with
varied color, size, position, rotation and background. Shapes are drawn as PIL
polygons into a 4x supersampled mask, box-downsampled (antialiasing) and
composited over the domain's background. No dataset library offers such a
parametric, captioned, domain-shifted generator, hence this file.

Content and look are seeded separately: `(seed, index)` fixes class, color index,
size and pose (identical in every domain); `(seed, domain, index)` fixes the
domain's background, shading, noise and caption template.
"""

from __future__ import annotations

import math
import zlib
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from .domains import (DOMAINS, SOURCE_DOMAIN, STYLE_FREE_SHARE, STYLE_FREE_TEMPLATES, TARGET_DOMAINS, WORLD,
                      WORLD_STYLES, WORLD_TEMPLATES, get_domain)
from .records import RealSample

__all__ = ["CLASSES", "COLORS", "DOMAINS", "SIZES", "SOURCE_DOMAIN", "TARGET_DOMAINS",
           "render_sample", "sample_attributes", "world_style"]

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart",
                            "cross", "hexagon", "ring", "arrow", "crescent")
# Shape diameter as a fraction of the image side.
SIZES: dict[str, tuple[float, float]] = {
    "small": (0.36, 0.44),
    "medium": (0.52, 0.62),
    "large": (0.70, 0.84),
}
SUPERSAMPLE = 4
#: Bumped whenever this module or ``domains.py`` changes what a built-in (seed, domain, index)
#: renders; the retrained generator's recipe version hashes it (``train_ldm.data_identity``).
RENDER_REVISION = 1
_N_COLORS = 8


def _regular(n: int, phase: float = -math.pi / 2, radius: float = 1.0) -> np.ndarray:
    t = phase + 2 * math.pi * np.arange(n) / n
    return radius * np.stack([np.cos(t), np.sin(t)], axis=1)


def _arc(cx: float, r: float, t0: float, t1: float, n: int) -> np.ndarray:
    t = np.linspace(t0, t1, n)
    return np.stack([cx + r * np.cos(t), r * np.sin(t)], axis=1)


def _crescent() -> np.ndarray:
    """Unit disk minus a disk of radius r centred at (d, 0), as one polygon."""
    d, r = 0.45, 0.85
    t0 = math.acos((1 + d * d - r * r) / (2 * d))  # where the two circles cross
    s0 = math.acos((math.cos(t0) - d) / r)
    outer = _arc(0.0, 1.0, t0, 2 * math.pi - t0, 40)
    inner = _arc(d, r, 2 * math.pi - s0, s0, 30)  # back along the cutting circle
    pts = np.concatenate([outer, inner])
    return pts - (pts.max(0) + pts.min(0)) / 2


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y], axis=1)
    pts -= (pts.max(0) + pts.min(0)) / 2
    return pts / np.abs(pts).max()


def _star() -> np.ndarray:
    outer, inner = _regular(5), _regular(5, phase=-math.pi / 2 + math.pi / 5, radius=0.45)
    return np.stack([outer, inner], axis=1).reshape(-1, 2)


def _cross(w: float = 0.32) -> np.ndarray:
    return np.array([(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1),
                     (-w, w), (-1, w), (-1, -w), (-w, -w)], dtype=np.float64)


def _arrow() -> np.ndarray:
    return np.array([(-1, -0.25), (0.1, -0.25), (0.1, -0.7), (1, 0), (0.1, 0.7), (0.1, 0.25),
                     (-1, 0.25)], dtype=np.float64)


# Each class: a list of (polygon in unit coordinates, is_hole).
_GEOMETRY: dict[str, list[tuple[np.ndarray, bool]]] = {
    "circle": [(_regular(64), False)],
    "square": [(_regular(4, phase=math.pi / 4), False)],
    "triangle": [(_regular(3) + np.array([0.0, 0.25]), False)],
    "star": [(_star(), False)],
    "heart": [(_heart(), False)],
    "cross": [(_cross(), False)],
    "hexagon": [(_regular(6), False)],
    "ring": [(_regular(64), False), (_regular(64, radius=0.55), True)],
    "arrow": [(_arrow(), False)],
    "crescent": [(_crescent(), False)],
}
assert tuple(_GEOMETRY) == CLASSES


def _check_args(index: int, resolution: int, seed: int) -> None:
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    if resolution < 8:
        raise ValueError(f"resolution must be >= 8, got {resolution}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")


@lru_cache(maxsize=64)
def _block_labels(seed: int, block: int) -> tuple[int, ...]:
    """Labels of indices [10*block, 10*block+10): a permutation, so every block of
    ten consecutive indices holds each class exactly once (balanced eval sets)."""
    return tuple(int(v) for v in np.random.default_rng([0xB10C, seed, block]).permutation(len(CLASSES)))


def sample_attributes(index: int, seed: int) -> dict:
    """Domain-independent content of sample `index`: class, color index, size and pose."""
    label = _block_labels(seed, index // len(CLASSES))[index % len(CLASSES)]
    rng = np.random.default_rng([0xA77, seed, index])
    size = list(SIZES)[int(rng.integers(len(SIZES)))]
    lo, hi = SIZES[size]
    frac = float(rng.uniform(lo, hi))
    max_shift = 0.8 * ((1.0 - frac) / 2 - 0.02)
    return {
        "label": label,
        "class": CLASSES[label],
        "color_index": int(rng.integers(_N_COLORS)),
        "size": size,
        "diameter": frac,
        "center": (0.5 + float(rng.uniform(-max_shift, max_shift)), 0.5 + float(rng.uniform(-max_shift, max_shift))),
        "rotation": float(rng.uniform(-math.pi / 4, math.pi / 4)),
    }


def _shape_mask(attrs: dict, res: int, outline: bool) -> np.ndarray:
    """Antialiased coverage in [0, 1], HxW float32."""
    big = res * SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    c, s = math.cos(attrs["rotation"]), math.sin(attrs["rotation"])
    rot = np.array([[c, -s], [s, c]])
    radius = attrs["diameter"] * big / 2
    center = np.array(attrs["center"]) * big
    width = max(1, round(max(1.25, 0.04 * res) * SUPERSAMPLE))
    for poly, hole in _GEOMETRY[attrs["class"]]:
        pts = [tuple(p) for p in (poly @ rot.T * radius + center).tolist()]
        if outline:
            draw.line(pts + [pts[0]], fill=255, width=width, joint="curve")
        else:
            draw.polygon(pts, fill=0 if hole else 255)
    return np.asarray(mask.reduce(SUPERSAMPLE), dtype=np.float32) / 255.0


@lru_cache(maxsize=64)
def _block_styles(seed: int, block: int) -> tuple[int, ...]:
    return tuple(int(v) for v in np.random.default_rng([0x57E, seed, block]).permutation(len(WORLD_STYLES)))


def world_style(index: int, seed: int) -> str:
    """The style of world sample ``index``: every block of 7 consecutive indices holds each style once."""
    return WORLD_STYLES[_block_styles(seed, index // len(WORLD_STYLES))[index % len(WORLD_STYLES)]]


def render_sample(index: int, domain: str, resolution: int, seed: int) -> RealSample:
    """Render built-in sample `index` of `domain` (an evaluation domain, a world style, or
    ``"world"``: the style :func:`world_style` picks, captioned without a style with
    probability ``STYLE_FREE_SHARE``); the same arguments give the same pixels and caption."""
    _check_args(index, resolution, seed)
    style = world_style(index, seed) if domain == WORLD else domain
    spec = get_domain(style)
    attrs = sample_attributes(index, seed)
    rng = np.random.default_rng([zlib.crc32(style.encode()), seed, index])
    color_name = list(spec.palette)[attrs["color_index"]]
    color = np.asarray(spec.palette[color_name], dtype=np.float32) + rng.uniform(-12, 12, size=3)
    color = spec.shade(np.clip(color, 0, 255), rng)
    background = spec.background(rng, resolution)
    alpha = _shape_mask(attrs, resolution, outline=spec.style == "outline")[..., None]
    img = spec.post(background * (1.0 - alpha) + color * alpha, rng)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    templates = spec.templates
    if domain == WORLD:
        caption_rng = np.random.default_rng([0xCA9, seed, index])
        templates = STYLE_FREE_TEMPLATES if caption_rng.random() < STYLE_FREE_SHARE else WORLD_TEMPLATES[style]
        template = templates[int(caption_rng.integers(len(templates)))]
    else:
        template = templates[int(rng.integers(len(templates)))]
    caption = template.format(size=attrs["size"], color=color_name, cls=attrs["class"])
    meta = {"class": attrs["class"], "label": attrs["label"], "color": color_name, "size": attrs["size"],
            "domain": domain, "style": style, "seed": seed, "index": index}
    return RealSample(key=f"{domain}-{seed}-{index:08d}", image=image, caption=caption, meta=meta)


COLORS: tuple[str, ...] = tuple(get_domain(SOURCE_DOMAIN).palette)
