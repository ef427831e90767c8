"""Fidelity of generated samples: does a sample still show what its caption says?

Three measurers, each fitted on real source-domain images only (and cached):

* **class**: a small CNN (:class:`ShapeClassifier`);
* **colour**: the dominant hue of the shape's pixels, nearest to each named colour's mean
  hue on real images (:class:`AttributeMeasurer`);
* **size**: the shape's area (summed coverage), between per-class thresholds fitted on real
  images (:class:`AttributeMeasurer`).

Fidelity is the share of samples whose measured attribute is the caption's, per attribute
and for all three together. Measured for the transport sampler (invert real images,
transport with ``rho``, sample) and for plain sampling from ``N(0, I)`` latents
(``alpha = 0``), all conditioned on the full caption. No library measures these attributes
of a procedural shape, hence this module.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import nn
from tqdm import tqdm

from edsam_online.data.shapes import CLASSES, COLORS, SIZES, SOURCE_DOMAIN, render_sample
from edsam_online.diffusion.pipeline import LatentDiffusion
from edsam_online.diffusion.sampler import EDSAMSampler, SamplerConfig

log = logging.getLogger(__name__)
CLASSIFIER_SEED = 101  # real images for the classifier: a different seed than the LDM's training data
EVAL_SEED = 202  # real images whose captions (and, for transport, pixels) drive generation


class ShapeClassifier(nn.Module):
    def __init__(self, num_classes: int = len(CLASSES)):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(128, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes),
        )

    def forward(self, x):
        return self.net(x)

    @torch.no_grad()
    def predict(self, images: np.ndarray) -> np.ndarray:
        self.eval()
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        return torch.cat([self(x[i:i + 256]).argmax(1) for i in range(0, len(x), 256)]).numpy()


def _real(n: int, resolution: int, seed: int, start: int = 0):
    s = [render_sample(i, SOURCE_DOMAIN, resolution, seed) for i in range(start, start + n)]
    return np.stack([x.image for x in s]), [x.caption for x in s], np.array([x.meta["label"] for x in s])


def _blur(images: np.ndarray, sigma: float) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = TF.gaussian_blur(x, kernel_size=5, sigma=sigma)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


ATTRIBUTES = ("class", "colour", "size")
_VOCABULARY = {"class": CLASSES, "colour": COLORS, "size": tuple(SIZES)}


def caption_attributes(caption: str) -> dict[str, str | None]:
    """The class, colour and size a caption names (``None`` where it names none, or more than one)."""
    words = set(re.findall(r"[a-z]+", caption.lower()))
    out = {}
    for attribute, vocabulary in _VOCABULARY.items():
        named = [v for v in vocabulary if v in words]
        out[attribute] = named[0] if len(named) == 1 else None
    return out


MIN_CONTRAST = 40.0  # RGB distance between shape and background below which no shape is seen


def shape_coverage(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image (uint8 ``[N, H, W, 3]``): (coverage ``[N, H, W]`` in [0, 1], shape colour
    ``[N, 3]``, background colour ``[N, 3]``).

    The background is the median of the border pixels; the shape's colour is the median of
    the pixels farthest from it (within 0.8 of the 95th percentile of the distance). Each
    pixel is unmixed as ``background * (1 - a) + shape * a``: the summed coverage ``a`` is
    the shape's area whatever the antialiasing or the blur of a decoder, since blurring
    moves coverage between pixels without changing its sum.
    """
    x = images.astype(np.float32)
    border = np.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], axis=1)
    bg = np.median(border, axis=1)
    diff = x - bg[:, None, None]
    dist = np.linalg.norm(diff, axis=-1)
    far = dist >= 0.8 * np.percentile(dist.reshape(len(x), -1), 95, axis=1)[:, None, None]
    fg = np.stack([np.median(x[i][far[i]], axis=0) for i in range(len(x))])
    v = fg - bg
    a = np.einsum("nhwc,nc->nhw", diff, v) / np.maximum((v * v).sum(1), 1e-6)[:, None, None]
    return np.clip(a, 0.0, 1.0), fg, bg


def _hue(rgb: np.ndarray) -> np.ndarray:
    """Hue in turns [0, 1) of ``[N, 3]`` RGB colours (HSV hue, as colorsys computes it)."""
    r, g, b = (rgb / 255.0).T
    mx, mn = rgb.max(1) / 255.0, rgb.min(1) / 255.0
    c = np.maximum(mx - mn, 1e-9)
    h = np.where(mx == r, ((g - b) / c) % 6, np.where(mx == g, (b - r) / c + 2, (r - g) / c + 4))
    return (h / 6.0) % 1.0


def _turn_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = np.abs(a - b) % 1.0
    return np.minimum(d, 1.0 - d)


@dataclass
class AttributeMeasurer:
    """Colour and size of the shape in an image, fitted on real source images (:meth:`fit`).

    ``hues``: each colour's circular mean hue (turns) on real images; a shape's colour is the
    nearest. ``area_edges``: per class, the coverage (share of the image) between small and
    medium and between medium and large; a shape is measured against its caption's class,
    whose outline sets how much of its diameter it fills. An image whose shape is not
    distinguishable from its background (:data:`MIN_CONTRAST`) has neither.
    """

    hues: dict[str, float]
    area_edges: dict[str, tuple[float, float]]

    def measure(self, images: np.ndarray, classes: list[str | None]) -> tuple[list[str | None], list[str | None]]:
        """(colours, sizes) of ``images`` (uint8 ``[N, H, W, 3]``); ``classes``: the class each is measured as."""
        a, fg, bg = shape_coverage(images)
        seen = np.linalg.norm(fg - bg, axis=1) >= MIN_CONTRAST
        names = list(self.hues)
        centres = np.array([self.hues[c] for c in names])
        nearest = _turn_distance(_hue(fg)[:, None], centres[None]).argmin(1)
        area = a.reshape(len(a), -1).mean(1)
        colours, sizes = [], []
        for i, cls in enumerate(classes):
            colours.append(names[nearest[i]] if seen[i] else None)
            if not seen[i] or cls not in self.area_edges:
                sizes.append(None)
                continue
            lo, hi = self.area_edges[cls]
            sizes.append("small" if area[i] < lo else "medium" if area[i] < hi else "large")
        return colours, sizes

    @classmethod
    def fit(cls, resolution: int = 32, n: int = 2000) -> AttributeMeasurer:
        """Fit on ``n`` real source images (seed :data:`CLASSIFIER_SEED`): mean hue per colour,
        and per class the geometric midpoints between the largest coverage of one size and the
        smallest of the next."""
        samples = [render_sample(i, SOURCE_DOMAIN, resolution, CLASSIFIER_SEED) for i in range(n)]
        a, fg, _ = shape_coverage(np.stack([s.image for s in samples]))
        hue, area = _hue(fg), a.reshape(n, -1).mean(1)
        hues = {}
        for colour in COLORS:
            h = hue[[s.meta["color"] == colour for s in samples]]
            hues[colour] = float(np.angle(np.exp(2j * np.pi * h).mean()) / (2 * np.pi) % 1.0)
        edges = {}
        for name in CLASSES:
            by_size = {size: area[[s.meta["class"] == name and s.meta["size"] == size for s in samples]]
                       for size in SIZES}
            small, medium, large = by_size.values()
            edges[name] = (float(np.sqrt(small.max() * medium.min())), float(np.sqrt(medium.max() * large.min())))
        return cls(hues, edges)

    def accuracy(self, resolution: int = 32, n: int = 1000, blur: float = 0.0) -> dict[str, float]:
        """Colour and size accuracy on ``n`` held-out real source images (after the fitting
        images), optionally Gaussian-blurred with ``blur`` px sigma."""
        images, captions, _ = _real(n, resolution, CLASSIFIER_SEED, start=10_000)
        if blur:
            images = _blur(images, blur)
        named = [caption_attributes(c) for c in captions]
        colours, sizes = self.measure(images, [t["class"] for t in named])
        return {"colour": float(np.mean([c == t["colour"] for c, t in zip(colours, named)])),
                "size": float(np.mean([s == t["size"] for s, t in zip(sizes, named)]))}


def load_or_fit_measurer(cache_dir: str, resolution: int = 32) -> AttributeMeasurer:
    """The fitted :class:`AttributeMeasurer`, cached as JSON (nothing unpickled) under ``cache_dir``."""
    path = Path(cache_dir).expanduser() / f"fidelity-attributes-{resolution}px.json"
    if path.is_file():
        state = json.loads(path.read_text())
        return AttributeMeasurer(state["hues"], {k: tuple(v) for k, v in state["area_edges"].items()})
    measurer = AttributeMeasurer.fit(resolution)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(measurer)))
    tmp.replace(path)
    return measurer


def train_classifier(resolution: int = 32, steps: int = 400, n: int = 6000, seed: int = 0) -> tuple[ShapeClassifier, float]:
    """Train the CNN on real source images; returns (model, accuracy on 1000 held-out real images).

    Half of the batches are Gaussian-blurred (sigma 0.3-1.2 px). A 32 px latent-diffusion
    model decodes through a small VAE whose outputs are softer than the procedural
    renders; a classifier that has only seen crisp edges reads that softness as a
    different class (a soft hexagon as a circle) and would measure the VAE's sharpness,
    not whether a sample keeps its caption's class. It still sees only real images.
    """
    torch.manual_seed(seed)
    imgs, _, labels = _real(n, resolution, CLASSIFIER_SEED)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    y = torch.from_numpy(labels)
    model = ShapeClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(range(steps), desc="fidelity classifier", mininterval=5):
        idx = torch.randint(0, len(x), (64,), generator=g)
        xb = x[idx]
        if torch.rand((), generator=g) < 0.5:  # flips keep every class's identity
            xb = xb.flip(3)
        if torch.rand((), generator=g) < 0.5:  # softness is not a class (see train_classifier)
            sigma = 0.3 + 0.9 * torch.rand((), generator=g).item()
            xb = TF.gaussian_blur(xb, kernel_size=5, sigma=sigma)
        loss = F.cross_entropy(model(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    test_imgs, _, test_labels = _real(1000, resolution, CLASSIFIER_SEED, start=n)
    acc = float((model.predict(test_imgs) == test_labels).mean())
    return model.eval(), acc


def load_or_train_classifier(cache_dir: str, resolution: int = 32) -> tuple[ShapeClassifier, float]:
    path = Path(cache_dir).expanduser() / f"fidelity-classifier-blur-{resolution}px.pt"
    if path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = ShapeClassifier()
        model.load_state_dict(state["model"])
        return model.eval(), float(state["real_acc"])
    model, acc = train_classifier(resolution)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "real_acc": acc}, tmp)
    tmp.replace(path)
    return model, acc


class AttributeScorer:
    """Scores generated samples against their captions with the three measurers: a sample's
    score is the share of the caption's class, colour and size that it shows (0, 1/3, 2/3 or
    1). An attribute the caption does not name counts as not shown, so captions outside the
    built-in vocabulary score 0; real captions need a CLIP scorer
    (:class:`edsam_online.diffusion.scoring.ClipScorer`)."""

    def __init__(self, classifier: ShapeClassifier, measurer: AttributeMeasurer):
        self.classifier, self.measurer = classifier, measurer

    def agreement(self, images: np.ndarray, captions: list[str]) -> dict[str, np.ndarray]:
        """Per attribute and for ``"all"`` three: whether each image shows what its caption names."""
        named = [caption_attributes(c) for c in captions]
        predicted = [CLASSES[i] for i in self.classifier.predict(images)]
        colours, sizes = self.measurer.measure(images, [t["class"] for t in named])
        out = {
            "class": np.array([p == t["class"] for p, t in zip(predicted, named)]),
            "colour": np.array([c is not None and c == t["colour"] for c, t in zip(colours, named)]),
            "size": np.array([z is not None and z == t["size"] for z, t in zip(sizes, named)]),
        }
        out["all"] = out["class"] & out["colour"] & out["size"]
        return out

    def __call__(self, images: np.ndarray, captions: list[str]) -> np.ndarray:
        agree = self.agreement(images, captions)
        return np.mean([agree[a] for a in ATTRIBUTES], axis=0).astype(np.float32)


def load_attribute_scorer(cache_dir: str, resolution: int = 32) -> tuple[AttributeScorer, dict[str, float]]:
    """The scorer of cached (or newly fitted) measurers, and each measurer's accuracy on
    held-out real images (``class``, ``colour``, ``size``; ``*_blurred`` at sigma 1 px)."""
    classifier, class_acc = load_or_train_classifier(cache_dir, resolution)
    measurer = load_or_fit_measurer(cache_dir, resolution)
    accuracy = {"class": class_acc, **measurer.accuracy(resolution)}
    accuracy.update({f"{k}_blurred": v for k, v in measurer.accuracy(resolution, blur=1.0).items()})
    return AttributeScorer(classifier, measurer), accuracy


@torch.no_grad()
def measure_fidelity(ldm: LatentDiffusion, scorer: AttributeScorer, cfg: SamplerConfig,
                     rhos=(0.0, 0.2, 0.5, 1.0), n: int = 200, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per setting (``"vae"``: the VAE's reconstructions of the real images, no diffusion, which
    bounds what any sampler can keep; ``"rho=R"``: the transport sampler, M = 1 per real image;
    ``"pure"``: plain sampling), the share of samples that keep their caption's ``class``,
    ``colour``, ``size`` and ``all`` three, and for the image-conditioned settings ``change``:
    the mean absolute pixel difference from the source image, in [0, 1]."""
    imgs, caps, _ = _real(n, cfg.resolution, EVAL_SEED)
    keys = [f"eval-{i}" for i in range(n)]
    bs = cfg.batch_size
    reconstructed = np.concatenate([ldm.decode(ldm.encode(imgs[i:i + bs])) for i in range(0, n, bs)])
    result = {"vae": {k: float(v.mean()) for k, v in scorer.agreement(reconstructed, caps).items()}}
    result["vae"]["change"] = float(np.abs(reconstructed.astype(np.float32) - imgs).mean() / 255)
    for rho in rhos:
        sampler = EDSAMSampler(ldm, replace(cfg, rho=float(rho), mode="transport", m=1))
        out = sampler.generate(imgs, caps, keys, m=1, seed=seed)
        row = {k: float(v.mean()) for k, v in scorer.agreement(out.images, caps).items()}
        # How far the samples move from their source images: a sampler that copied its
        # input would score perfect fidelity, so the two are read together.
        row["change"] = float(np.abs(out.images.astype(np.float32) - imgs).mean() / 255)
        result[f"rho={rho:g}"] = row
        log.info("fidelity rho=%g: %s", rho, row)
    g = torch.Generator().manual_seed(seed)
    pure = []
    for i in range(0, n, cfg.batch_size):
        cond = ldm.embed(caps[i:i + cfg.batch_size])
        f = ldm.vae_scale_factor
        z = torch.randn((len(cond), ldm.unet.config.in_channels, cfg.resolution // f, cfg.resolution // f),
                        generator=g).to(ldm.device)
        pure.append(ldm.decode(ldm.sample(z, cond, cfg.steps, cfg.guidance)))
    result["pure"] = {k: float(v.mean()) for k, v in scorer.agreement(np.concatenate(pure), caps).items()}
    return result
