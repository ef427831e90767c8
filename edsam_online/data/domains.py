"""Visual domains of the built-in shapes data: one source, several shifted targets.

Single-source domain generalization (the ED-SAM setting): a model trains on the
source domain `flat` only and is evaluated on every domain. Each domain decides
how a sample *looks* (background, fill or outline, color palette, shading,
post-processing) and how its caption is phrased; the *content* (class, color
name, size, pose) comes from `shapes.py` and is the same for one (seed, index)
in every domain, so accuracy differences across domains measure the shift alone.

Every caption template names size, color and class (`{size} {color} {cls}`).

The generator's **world** (``WORLD``) is wider than the trainer's data: the same content
rendered in the styles of ``WORLD_STYLES``, i.e. the source, three of the targets
(``clutter``, ``dark``, ``photo``: the *generator-seen* targets) and three styles that
belong to the world alone (``gradient``, ``texture``, ``pattern``). The other targets
(``sketch``, ``noisy``, ``palette``) are *generator-unseen*: nothing here trains on them.
Half of the world's captions name only the content (:data:`STYLE_FREE_TEMPLATES`), so a
caption that names no style leaves the style to the generator's prior, as a CC3M caption
does for Stable Diffusion; the other half use the style's own templates. The world's
``flat`` images take the source templates that name the light, plain background (the
ones that name a style), so a source caption that asks for a light background is kept
to one by the generator, while the source's style-free captions leave it free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .pictures import PHOTOS, TEXTURES, random_crop

RGB = tuple[int, int, int]

# Colors seen in training (source and most targets).
BASE_PALETTE: dict[str, RGB] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 200, 30),
    "orange": (245, 130, 25),
    "purple": (125, 50, 175),
    "pink": (240, 110, 170),
    "cyan": (30, 185, 205),
}
# Colors never seen in the source domain (the `palette` target). Same count as the
# base palette so a sample's color index maps to a color in either.
UNSEEN_PALETTE: dict[str, RGB] = {
    "teal": (0, 120, 110),
    "magenta": (200, 0, 150),
    "lime": (150, 215, 40),
    "navy": (20, 30, 110),
    "maroon": (120, 20, 40),
    "olive": (120, 120, 30),
    "brown": (130, 80, 40),
    "gold": (200, 160, 50),
}

SOURCE_TEMPLATES = (
    "a {size} {color} {cls} on a light background",
    "a photo of a {size} {color} {cls}",
    "a {size} {color} {cls}",
    "a picture of a {size} {color} {cls} on a plain background",
    "a {size} {cls} in {color}",
    "a {size} {cls} colored {color}",
)


def _light_background(rng: np.random.Generator, res: int) -> np.ndarray:
    base = rng.integers(215, 256, size=3).astype(np.float32)
    return np.broadcast_to(base, (res, res, 3)).copy()


def _paper_background(rng: np.random.Generator, res: int) -> np.ndarray:
    base = np.float32(rng.integers(238, 256))
    return np.full((res, res, 3), base, dtype=np.float32)


def _dark_background(rng: np.random.Generator, res: int) -> np.ndarray:
    base = rng.integers(10, 45, size=3).astype(np.float32)
    return np.broadcast_to(base, (res, res, 3)).copy()


def _clutter_background(rng: np.random.Generator, res: int) -> np.ndarray:
    """A smooth random color field (a low-res grid upsampled) crossed by random strokes."""
    cells = int(rng.integers(3, 7))
    grid = rng.integers(60, 235, size=(cells, cells, 3), dtype=np.uint8)
    img = Image.fromarray(grid).resize((res, res), Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    width = max(1, round(0.03 * res))
    for _ in range(int(rng.integers(4, 9))):
        x0, y0, x1, y1 = (rng.random(4) * res).tolist()
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.line((x0, y0, x1, y1), fill=color, width=width)
    return np.asarray(img, dtype=np.float32)


def _photo_background(rng: np.random.Generator, res: int) -> np.ndarray:
    return random_crop(rng, PHOTOS, res)


def _texture_background(rng: np.random.Generator, res: int) -> np.ndarray:
    """A grey texture (brick, grass, gravel) mapped between two random colours."""
    grey = random_crop(rng, TEXTURES, res, scale=(0.3, 0.8)) / 255.0
    lo, hi = rng.integers(0, 140, size=3), rng.integers(110, 256, size=3)
    return (lo + grey * (hi - lo)).astype(np.float32)


def _gradient_background(rng: np.random.Generator, res: int) -> np.ndarray:
    """A linear blend between two random colours at a random angle."""
    a, b = rng.integers(0, 256, size=(2, 3)).astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:res, 0:res] / max(1, res - 1) - 0.5
    t = (np.cos(theta) * xx + np.sin(theta) * yy) / 0.71 + 0.5
    return (a + np.clip(t, 0, 1)[..., None] * (b - a)).astype(np.float32)


def _pattern_background(rng: np.random.Generator, res: int) -> np.ndarray:
    """Stripes (at 0, 45, 90 or 135 degrees) or checks of two random colours."""
    a, b = rng.integers(0, 256, size=(2, 3)).astype(np.float32)
    period = rng.uniform(0.12, 0.3) * res
    yy, xx = np.mgrid[0:res, 0:res].astype(np.float32)
    if rng.random() < 0.3:
        on = ((xx // (period / 2)) + (yy // (period / 2))) % 2 == 0
    else:
        angle = np.pi / 4 * int(rng.integers(4))
        on = ((np.cos(angle) * xx + np.sin(angle) * yy) % period) < period / 2
    return np.where(on[..., None], a, b).astype(np.float32)


def _identity(color: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return color


def _dim(color: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return color * rng.uniform(0.3, 0.45)


def _no_post(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return img


def _blur_and_noise(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    res = img.shape[0]
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    blurred = np.asarray(pil.filter(ImageFilter.GaussianBlur(radius=0.035 * res)), dtype=np.float32)
    return blurred + rng.normal(0.0, 32.0, size=img.shape).astype(np.float32)


@dataclass(frozen=True)
class Domain:
    """How one domain renders and words a sample.

    background(rng, res) -> float32 HxWx3; shade(rgb, rng) -> rgb of the shape;
    post(img, rng) -> img after compositing; style "fill" or "outline".
    """

    name: str
    description: str
    palette: dict[str, RGB]
    style: str
    background: Callable[[np.random.Generator, int], np.ndarray]
    shade: Callable[[np.ndarray, np.random.Generator], np.ndarray]
    post: Callable[[np.ndarray, np.random.Generator], np.ndarray]
    templates: tuple[str, ...]


SOURCE_DOMAIN = "flat"

_DOMAIN_LIST = (
    Domain("flat", "solid fills on plain light backgrounds (the training source)", BASE_PALETTE, "fill",
           _light_background, _identity, _no_post, SOURCE_TEMPLATES),
    Domain("sketch", "outline only on white paper", BASE_PALETTE, "outline",
           _paper_background, _identity, _no_post,
           ("a sketch of a {size} {color} {cls}",
            "a {size} {color} outline of a {cls}",
            "a line drawing of a {size} {color} {cls}",
            "a {size} {color} {cls} drawn as an outline")),
    Domain("clutter", "solid shape on a textured, cluttered background", BASE_PALETTE, "fill",
           _clutter_background, _identity, _no_post,
           ("a {size} {color} {cls} on a cluttered background",
            "a photo of a {size} {color} {cls} on a busy textured background",
            "a {size} {color} {cls} in front of clutter")),
    Domain("dark", "dimmed shape on a dark background (low contrast)", BASE_PALETTE, "fill",
           _dark_background, _dim, _no_post,
           ("a dim photo of a {size} {color} {cls}",
            "a {size} {color} {cls} on a dark background",
            "a dark low-contrast picture of a {size} {color} {cls}")),
    Domain("noisy", "flat rendering, then Gaussian blur and strong pixel noise", BASE_PALETTE, "fill",
           _light_background, _identity, _blur_and_noise,
           ("a blurry photo of a {size} {color} {cls}",
            "a noisy picture of a {size} {color} {cls}",
            "a {size} {color} {cls}, blurred and grainy")),
    Domain("palette", "flat rendering in colors never seen in the source", UNSEEN_PALETTE, "fill",
           _light_background, _identity, _no_post, SOURCE_TEMPLATES),
    Domain("photo", "solid shape over a crop of a photograph", BASE_PALETTE, "fill",
           _photo_background, _identity, _no_post,
           ("a {size} {color} {cls} in front of a photograph",
            "a {size} {color} {cls} pasted on a photo background",
            "a {size} {color} {cls} over a photographic scene")),
)
# Styles of the generator's world that no evaluation domain has.
_WORLD_ONLY = (
    Domain("gradient", "solid shape on a two-colour gradient", BASE_PALETTE, "fill",
           _gradient_background, _identity, _no_post,
           ("a {size} {color} {cls} on a gradient background",
            "a {size} {color} {cls} over a colour gradient")),
    Domain("texture", "solid shape on a tinted brick, grass or gravel texture", BASE_PALETTE, "fill",
           _texture_background, _identity, _no_post,
           ("a {size} {color} {cls} on a textured surface",
            "a {size} {color} {cls} on a rough tinted texture")),
    Domain("pattern", "solid shape on two-colour stripes or checks", BASE_PALETTE, "fill",
           _pattern_background, _identity, _no_post,
           ("a {size} {color} {cls} on a patterned background",
            "a {size} {color} {cls} in front of stripes or checks")),
)

DOMAIN_SPECS: dict[str, Domain] = {d.name: d for d in _DOMAIN_LIST}
DOMAINS: tuple[str, ...] = tuple(DOMAIN_SPECS)
TARGET_DOMAINS: tuple[str, ...] = tuple(d for d in DOMAINS if d != SOURCE_DOMAIN)
STYLE_SPECS: dict[str, Domain] = {**DOMAIN_SPECS, **{d.name: d for d in _WORLD_ONLY}}

#: The generator's world corpus, a built-in data domain of its own (``data.domain=world``).
WORLD = "world"
WORLD_STYLES: tuple[str, ...] = ("flat", "clutter", "dark", "photo", "gradient", "texture", "pattern")
#: Captions that name the content alone; half of the world's captions use one of them.
STYLE_FREE_TEMPLATES = (
    "a {size} {color} {cls}",
    "a photo of a {size} {color} {cls}",
    "a {size} {cls} in {color}",
    "a {size} {cls} colored {color}",
    "a picture of a {size} {color} {cls}",
)
STYLE_FREE_SHARE = 0.5
#: Each world style's own captions: the style's templates less the style-free ones.
WORLD_TEMPLATES: dict[str, tuple[str, ...]] = {
    name: tuple(t for t in STYLE_SPECS[name].templates if t not in STYLE_FREE_TEMPLATES) for name in WORLD_STYLES}
#: What built-in data can render: every style, and the world (a mixture of its styles).
BUILTIN_DOMAINS: tuple[str, ...] = (*STYLE_SPECS, WORLD)


def get_domain(name: str) -> Domain:
    """The renderer of an evaluation domain or a world style."""
    if name not in STYLE_SPECS:
        raise ValueError(f"domain must be one of {list(STYLE_SPECS)}, got {name!r}")
    return STYLE_SPECS[name]
