"""Photographs and textures for backgrounds: scikit-image's shipped sample pictures.

The built-in world corpus (the generator's data, :mod:`edsam_online.data.domains`) needs
photographic variety that no procedural renderer has. scikit-image's wheel ships a set of
sample pictures as plain files (``skimage/data/*.png|jpg``); they are read here with PIL
straight from the installed package folder, without importing ``skimage`` itself (nothing
is downloaded: the pictures that scikit-image fetches on demand are not used).
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

#: Colour photographs, the backgrounds of the ``photo`` style.
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
          "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "color.png")
#: Grey-level textures, tinted by the ``texture`` style.
TEXTURES = ("brick.png", "grass.png", "gravel.png")
_SHORT_SIDE = 192  # pictures are kept at this short side: crops of a 32-256 px render need no more


def _data_dir() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the world corpus needs scikit-image's sample pictures: pip install scikit-image")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


@lru_cache(maxsize=None)
def load_picture(name: str) -> np.ndarray:
    """Picture ``name`` as float32 ``[H, W, C]`` in [0, 255] (C = 3 for photos, 1 for textures),
    its short side resized to 192 px."""
    with Image.open(_data_dir() / name) as im:
        im = im.convert("L" if name in TEXTURES else "RGB")
        scale = _SHORT_SIDE / min(im.size)
        im = im.resize((round(im.size[0] * scale), round(im.size[1] * scale)), Image.BILINEAR)
        arr = np.asarray(im, dtype=np.float32)
    return arr[..., None] if arr.ndim == 2 else arr


def random_crop(rng: np.random.Generator, names: tuple[str, ...], res: int,
                scale: tuple[float, float] = (0.25, 0.6)) -> np.ndarray:
    """A random square crop (side ``scale`` of the picture's short side) of a random picture
    among ``names``, resized to ``res`` x ``res``, float32 ``[res, res, C]``."""
    pic = load_picture(names[int(rng.integers(len(names)))])
    h, w = pic.shape[:2]
    side = max(2, int(rng.uniform(*scale) * min(h, w)))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = np.ascontiguousarray(pic[y:y + side, x:x + side])
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    img = Image.fromarray(crop.squeeze(-1).astype(np.uint8) if crop.shape[-1] == 1 else crop.astype(np.uint8))
    out = np.asarray(img.resize((res, res), Image.BILINEAR), dtype=np.float32)
    return out[..., None] if out.ndim == 2 else out
