"""A user's own data and models, built here: captioned webdataset shards and an ImageFolder
tree drawn with PIL, a tiny Stable Diffusion folder (diffusers layout) and a tiny CLIP in
ViT-B-32's architecture (``local-dir:`` open_clip folder), random weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220)}
SHAPES = ("circle", "square", "triangle")


def draw(shape: str, color: str, size: int, rng: np.random.Generator) -> Image.Image:
    background = tuple(int(v) for v in rng.integers(150, 256, 3))
    image = Image.new("RGB", (size, size), background)
    d, r = ImageDraw.Draw(image), size // 2
    box = [r - r // 2, r - r // 2, r + r // 2, r + r // 2]
    if shape == "circle":
        d.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        d.rectangle(box, fill=COLORS[color])
    else:
        d.polygon([(r, box[1]), (box[0], box[3]), (box[2], box[3])], fill=COLORS[color])
    return image


def write_shards(folder: Path, n: int, shards: int, size: int = 96, seed: int = 0) -> str:
    """``n`` captioned images over ``shards`` tar files (img2dataset layout); the brace pattern."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for s in range(shards):
        with wds.TarWriter(str(folder / f"{s:05d}.tar")) as sink:
            for i in range(s * n // shards, (s + 1) * n // shards):
                shape, color = SHAPES[i % 3], list(COLORS)[(i // 3) % 3]
                sink.write({"__key__": f"{i:06d}", "jpg": draw(shape, color, size, rng),
                            "txt": f"a photo of a {color} {shape}", "cls": SHAPES.index(shape)})
    return f"{folder}/{{00000..{shards - 1:05d}}}.tar"


def write_imagefolder(folder: Path, per_class: int, size: int = 96, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    for shape in SHAPES:
        (folder / shape).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw(shape, list(COLORS)[i % 3], size, rng).save(folder / shape / f"{i}.png")
    return folder


def tiny_sd_folder(folder: Path, resolution: int = 64) -> Path:
    """A random-weight Stable Diffusion folder (vae/ unet/ text_encoder/ tokenizer/ scheduler/)."""
    from edsam_online.diffusion import SamplerConfig, build_tiny_ldm

    build_tiny_ldm(SamplerConfig(resolution=resolution, seed=0), layout="sd").save_pretrained(folder)
    return folder


def tiny_vit_b32(folder: Path) -> str:
    """open_clip's ViT-B-32 at 224 px with every width and depth cut down (patch 32): the
    ``model.name`` of its ``local-dir:`` folder, random weights."""
    from edsam_online.models import write_stand_in

    return write_stand_in("ViT-B-32", folder)
