"""Fidelity of generated samples: does a sample still show what its caption says, and in which style?

One measurer (:class:`WorldMeasurer`), a small CNN with four heads (class, colour, size and
style), is fitted on rendered images of every style of the generator's world
(:data:`~edsam_online.data.domains.WORLD_STYLES`): a measurer fitted on the source alone
cannot judge a sample that the transport restyled. Its held-out accuracy is reported with
every measurement (:func:`load_attribute_scorer`).

Fidelity is the share of samples whose measured attribute is the caption's, per attribute
and for all three together; the **off-style** share is the share the style head puts outside
the source style ``flat``. Both are measured (:func:`measure_fidelity`) for the VAE's
reconstructions, ``identity`` (``z_t = z_s``: invert and sample back), the transport sampler
at several ``rho`` and pure sampling from ``N(0, I)``, all conditioned on the source's own
(``flat``) captions. No library measures these attributes of a procedural shape, hence this
module.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import nn
from tqdm import tqdm

from edsam_online.data.domains import SOURCE_DOMAIN, WORLD_STYLES
from edsam_online.data.shapes import CLASSES, COLORS, SIZES, render_sample
from edsam_online.diffusion.pipeline import LatentDiffusion
from edsam_online.diffusion.config import SamplerConfig
from edsam_online.diffusion.sampler import EDSAMSampler

log = logging.getLogger(__name__)
MEASURER_SEED = 101  # world renders for the measurer: a different seed than the LDM's training data
EVAL_SEED = 202  # source images whose captions (and, for transport, pixels) drive generation
ATTRIBUTES = ("class", "colour", "size")
#: What each head of the measurer predicts, in label order.
HEADS: dict[str, tuple[str, ...]] = {"class": CLASSES, "colour": COLORS, "size": tuple(SIZES), "style": WORLD_STYLES}
_META = {"class": "class", "colour": "color", "size": "size", "style": "style"}
#: The measurer's training recipe; a change retrains the cached measurer (its file is named by it).
MEASURER_RECIPE = {"revision": 2, "n": 14000, "steps": 1500, "batch": 128, "lr": 3e-3, "seed": 0}


def caption_attributes(caption: str) -> dict[str, str | None]:
    """The class, colour and size a caption names (``None`` where it names none, or more than one)."""
    words = set(re.findall(r"[a-z]+", caption.lower()))
    out = {}
    for attribute in ATTRIBUTES:
        named = [v for v in HEADS[attribute] if v in words]
        out[attribute] = named[0] if len(named) == 1 else None
    return out


def world_renders(n: int, resolution: int, seed: int = MEASURER_SEED, start: int = 0):
    """``n`` rendered images spread evenly over the world's styles (uint8 ``[n, H, W, 3]``)
    and their labels per head (int64 arrays)."""
    samples = [render_sample(i, WORLD_STYLES[i % len(WORLD_STYLES)], resolution, seed)
               for i in range(start, start + n)]
    labels = {head: np.array([names.index(s.meta[_META[head]]) for s in samples]) for head, names in HEADS.items()}
    return np.stack([s.image for s in samples]), labels


def source_renders(n: int, resolution: int, seed: int = EVAL_SEED):
    """``n`` renders of the trainer's source domain and their captions."""
    samples = [render_sample(i, SOURCE_DOMAIN, resolution, seed) for i in range(n)]
    return np.stack([s.image for s in samples]), [s.caption for s in samples]


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return TF.gaussian_blur(x, kernel_size=5, sigma=sigma)


class WorldMeasurer(nn.Module):
    """A CNN with one linear head per entry of :data:`HEADS`.

    Its last two convolutions work at 4 x 4, so that a unit sees the whole 32 px image before
    pooling: with a 17 px receptive field (revision 1) the pooled features were local edges,
    which cannot tell a hexagon from a circle or a large shape's class at all (held-out class
    accuracy 0.77, and the same on its training images)."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(128, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(128, 256, 3, padding=1), nn.BatchNorm2d(256), nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1), nn.BatchNorm2d(256), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.heads = nn.ModuleDict({head: nn.Linear(256, len(names)) for head, names in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.trunk(x)
        return {head: layer(f) for head, layer in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Label index per head of uint8 ``[N, H, W, 3]`` images."""
        self.eval()
        x = _to_tensor(images)
        out: dict[str, list] = {head: [] for head in HEADS}
        for i in range(0, len(x), 256):
            for head, logits in self(x[i:i + 256]).items():
                out[head].append(logits.argmax(1))
        return {head: torch.cat(v).numpy() for head, v in out.items()}

    def accuracy(self, images: np.ndarray, labels: dict[str, np.ndarray]) -> dict[str, float]:
        predicted = self.predict(images)
        return {head: float((predicted[head] == labels[head]).mean()) for head in HEADS}


def train_measurer(resolution: int, recipe: dict = MEASURER_RECIPE) -> tuple[WorldMeasurer, dict[str, float]]:
    """Train the measurer on world renders; returns it and each head's accuracy on 1400
    held-out world renders (200 per style).

    Half of the batches are Gaussian-blurred (sigma 0.3-1.2 px): a 32 px latent-diffusion
    model decodes through a small VAE whose outputs are softer than the renders, and a
    measurer that has only seen crisp edges reads that softness as something else (a soft
    hexagon as a circle); it still sees only rendered images."""
    torch.manual_seed(recipe["seed"])
    images, labels = world_renders(recipe["n"], resolution)
    x = _to_tensor(images)
    y = {head: torch.from_numpy(v) for head, v in labels.items()}
    model = WorldMeasurer()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe["lr"], total_steps=recipe["steps"])
    g = torch.Generator().manual_seed(recipe["seed"])
    model.train()
    for _ in tqdm(range(recipe["steps"]), desc="fidelity measurer", mininterval=5):
        idx = torch.randint(0, len(x), (recipe["batch"],), generator=g)
        xb = x[idx]
        if torch.rand((), generator=g) < 0.5:  # flips keep every label
            xb = xb.flip(3)
        if torch.rand((), generator=g) < 0.5:  # softness is not a label (see above)
            xb = _blur(xb, 0.3 + 0.9 * torch.rand((), generator=g).item())
        logits = model(xb)
        loss = sum(F.cross_entropy(logits[head], y[head][idx]) for head in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    held_images, held_labels = world_renders(200 * len(WORLD_STYLES), resolution, start=recipe["n"])
    return model, model.accuracy(held_images, held_labels)


#: Where the measurer of the current recipe ships: ``<MEASURER_DIR>/<measurer_file_name(32)>``.
MEASURER_DIR = Path(__file__).resolve().parent / "weights"


def measurer_file_name(resolution: int) -> str:
    """``fidelity-world-measurer-<res>px-<recipe hash>.safetensors``: named by the recipe, so a
    changed recipe is trained anew, never served from an older file."""
    version = hashlib.sha256(json.dumps(MEASURER_RECIPE, sort_keys=True).encode()).hexdigest()[:8]
    return f"fidelity-world-measurer-{resolution}px-{version}.safetensors"


def load_or_train_measurer(cache_dir: str, resolution: int) -> tuple[WorldMeasurer, dict[str, float]]:
    """The measurer of :data:`MEASURER_RECIPE` and its held-out accuracy per head: the shipped
    file (32 px) when it is of this recipe, else the one cached under ``cache_dir``, trained
    there first if missing. Weights and accuracy are stored as safetensors (its metadata holds
    the accuracy): nothing is unpickled."""
    from safetensors.torch import load_file, save_file

    name = measurer_file_name(resolution)
    path = MEASURER_DIR / name
    if not path.is_file():
        path = Path(cache_dir).expanduser() / name
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            accuracy = json.loads(f.metadata()["accuracy"])
        model = WorldMeasurer()
        model.load_state_dict(load_file(str(path)))
        return model.eval(), {k: float(v) for k, v in accuracy.items()}
    model, accuracy = train_measurer(resolution)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp),
              metadata={"accuracy": json.dumps(accuracy), "recipe": json.dumps(MEASURER_RECIPE, sort_keys=True)})
    tmp.replace(path)
    return model, accuracy


class AttributeScorer:
    """Scores generated samples against their captions with the measurer: a sample's score is
    the share of the caption's class, colour and size that it shows (0, 1/3, 2/3 or 1). An
    attribute the caption does not name counts as not shown, so captions outside the built-in
    vocabulary score 0; real captions need a CLIP scorer
    (:class:`edsam_online.diffusion.scoring.ClipScorer`)."""

    def __init__(self, measurer: WorldMeasurer):
        self.measurer = measurer

    def agreement(self, images: np.ndarray, captions: list[str]) -> dict[str, np.ndarray]:
        """Per attribute and for ``"all"`` three: whether each image shows what its caption
        names; and ``"off_style"``: whether its style is not the source's."""
        named = [caption_attributes(c) for c in captions]
        predicted = self.measurer.predict(images)
        out = {a: np.array([HEADS[a][p] == t[a] for p, t in zip(predicted[a], named)]) for a in ATTRIBUTES}
        out["all"] = out["class"] & out["colour"] & out["size"]
        out["off_style"] = np.array([HEADS["style"][p] != SOURCE_DOMAIN for p in predicted["style"]])
        return out

    def styles(self, images: np.ndarray) -> list[str]:
        return [HEADS["style"][p] for p in self.measurer.predict(images)["style"]]

    def __call__(self, images: np.ndarray, captions: list[str]) -> np.ndarray:
        agree = self.agreement(images, captions)
        return np.mean([agree[a] for a in ATTRIBUTES], axis=0).astype(np.float32)


def load_attribute_scorer(cache_dir: str, resolution: int) -> tuple[AttributeScorer, dict[str, float]]:
    """The scorer of the cached (or newly trained) measurer, and each head's accuracy on
    held-out world renders."""
    measurer, accuracy = load_or_train_measurer(cache_dir, resolution)
    return AttributeScorer(measurer), accuracy


def _row(scorer: AttributeScorer, images: np.ndarray, captions: list[str], sources: np.ndarray | None) -> dict:
    row = {k: float(v.mean()) for k, v in scorer.agreement(images, captions).items()}
    if sources is not None:  # a sampler that copied its input would keep everything: read both
        row["change"] = float(np.abs(images.astype(np.float32) - sources).mean() / 255)
    return row


@torch.no_grad()
def measure_fidelity(ldm: LatentDiffusion, scorer: AttributeScorer, cfg: SamplerConfig,
                     rhos=(0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5), n: int = 200,
                     seed: int = 0) -> dict[str, dict[str, float]]:
    """Per setting, the share of samples that keep their caption's ``class``, ``colour``,
    ``size`` and ``all`` three, the share ``off_style`` (outside ``flat``) and, for the
    image-conditioned settings, ``change``: the mean absolute pixel difference from the
    source, in [0, 1]. Settings: ``vae`` (the VAE's reconstructions of the sources, no
    diffusion: what any sampler can keep at best), ``identity`` (``z_t = z_s``), ``rho=R``
    (the transport sampler, M = 1 per source) and ``pure`` (sampling from ``N(0, I)`` under
    the same captions). The sources are ``n`` renders of ``flat`` (seed :data:`EVAL_SEED`)."""
    imgs, caps = source_renders(n, cfg.resolution)
    keys = [f"eval-{i}" for i in range(n)]
    bs = cfg.batch_size
    reconstructed = np.concatenate([ldm.decode(ldm.encode(imgs[i:i + bs])) for i in range(0, n, bs)])
    result = {"vae": _row(scorer, reconstructed, caps, imgs)}
    for label, mode, rho in [("identity", "identity", 0.0)] + [(f"rho={r:g}", "transport", float(r)) for r in rhos]:
        sampler = EDSAMSampler(ldm, replace(cfg, rho=rho, mode=mode, m=1))
        result[label] = _row(scorer, sampler.generate(imgs, caps, keys, m=1, seed=seed).images, caps, imgs)
        log.info("fidelity %s: %s", label, result[label])
    g = torch.Generator().manual_seed(seed)
    pure = []
    for i in range(0, n, bs):
        cond = ldm.embed(caps[i:i + bs])
        f = ldm.vae_scale_factor
        z = torch.randn((len(cond), ldm.unet.config.in_channels, cfg.resolution // f, cfg.resolution // f),
                        generator=g).to(ldm.device)
        pure.append(ldm.decode(ldm.sample(z, cond, cfg.steps, cfg.guidance)))
    result["pure"] = _row(scorer, np.concatenate(pure), caps, None)
    return result


def frontier(result: dict[str, dict[str, float]]) -> list[tuple[float, dict[str, float]]]:
    """The transport's points of one measurement, by rho: (rho, row)."""
    points = [(float(k.split("=", 1)[1]), row) for k, row in result.items() if k.startswith("rho=")]
    return sorted(points, key=lambda p: p[0])


def best_on_frontier(results: dict[str, dict[str, dict[str, float]]], min_class: float = 0.90,
                     min_colour: float = 0.85) -> tuple[str, float] | None:
    """The (sampler setting, rho) with the largest off-style share among the points of every
    setting's frontier that keep the caption's class in at least ``min_class`` and its colour
    in at least ``min_colour`` of the samples; None where no point does. This is how the
    sampler preset is chosen: on fidelity alone, never on an evaluation domain."""
    best, best_off = None, -1.0
    for setting, result in results.items():
        for rho, row in frontier(result):
            if row["class"] >= min_class and row["colour"] >= min_colour and row["off_style"] > best_off:
                best, best_off = (setting, rho), row["off_style"]
    return best


def fallback_on_frontier(results: dict[str, dict[str, dict[str, float]]],
                         min_off_style: float = 0.25) -> tuple[str, float] | None:
    """Where no point meets :func:`best_on_frontier`'s content bars: the (sampler setting, rho)
    that keeps the most content (class, colour and size together; then class) among the points
    with at least ``min_off_style`` of their samples outside the source style. A preset must
    leave the source style, or ED-SAM has nothing to add over ``identity``; this rule keeps
    as much of the caption as a generator that cannot meet the bars allows. None where no
    point is that far off-style. Fidelity alone, like the rule it stands in for."""
    best, best_key = None, (-1.0, -1.0)
    for setting, result in results.items():
        for rho, row in frontier(result):
            key = (row["all"], row["class"])
            if row["off_style"] >= min_off_style and key > best_key:
                best, best_key = (setting, rho), key
    return best
