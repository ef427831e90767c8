"""Class fidelity of generated samples: does a sample still show its caption's class?

A small CNN trained on real source-domain images (cached) classifies generated samples;
fidelity is the share assigned their caption's class. Measured for the transport sampler
(invert real images, transport with ``rho``, sample) and for plain sampling from
``N(0, I)`` latents (``alpha = 0``), all conditioned on the full caption.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import nn
from tqdm import tqdm

from edsam_online.data.shapes import CLASSES, SOURCE_DOMAIN, render_sample
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


@torch.no_grad()
def measure_fidelity(ldm: LatentDiffusion, classifier: ShapeClassifier, cfg: SamplerConfig,
                     rhos=(0.0, 0.2, 0.5, 1.0), n: int = 200, seed: int = 0) -> dict[str, float]:
    """Fidelity per rho (transport sampler, M = 1 per real image) and for pure sampling ("pure"),
    plus, per rho, the mean absolute pixel change from the source image ("change rho=...", in [0, 1])."""
    imgs, caps, labels = _real(n, cfg.resolution, EVAL_SEED)
    keys = [f"eval-{i}" for i in range(n)]
    result = {}
    for rho in rhos:
        sampler = EDSAMSampler(ldm, replace(cfg, rho=float(rho), mode="transport", m=1))
        out = sampler.generate(imgs, caps, keys, m=1, seed=seed)
        result[f"rho={rho:g}"] = float((classifier.predict(out.images) == labels).mean())
        # How far the samples move from their source images: a sampler that copied its
        # input would score perfect fidelity, so the two are read together.
        result[f"change rho={rho:g}"] = float(np.abs(out.images.astype(np.float32) - imgs).mean() / 255)
        log.info("fidelity rho=%g: %.3f (mean |sample - source| %.3f)", rho, result[f"rho={rho:g}"],
                 result[f"change rho={rho:g}"])
    g = torch.Generator().manual_seed(seed)
    pure = []
    for i in range(0, n, cfg.batch_size):
        cond = ldm.embed(caps[i:i + cfg.batch_size])
        f = ldm.vae_scale_factor
        z = torch.randn((len(cond), ldm.unet.config.in_channels, cfg.resolution // f, cfg.resolution // f),
                        generator=g).to(ldm.device)
        pure.append(ldm.decode(ldm.sample(z, cond, cfg.steps, cfg.guidance)))
    result["pure"] = float((classifier.predict(np.concatenate(pure)) == labels).mean())
    return result
