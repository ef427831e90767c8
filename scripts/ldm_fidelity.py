"""Fidelity of an LDM's samples to their captions at several rho, and for pure sampling.

    python scripts/ldm_fidelity.py [--model retrained] [--n 200] [--guidance 3] [--rhos 0 0.2 0.5 1.0]
                                   [--deepcache-interval N]

Fits (and caches) the three measurers of :mod:`edsam_online.diffusion.fidelity` on real
source-domain images and prints their accuracy on held-out real images, then the share of
generated samples that keep their caption's class, colour, size and all three, with each
setting's change from its source image. The retrained LDM is trained first if it is not
cached yet (``python -m edsam_online.diffusion.train_ldm``).
"""

import argparse
import json
import logging
import time

import torch

from edsam_online.diffusion import SamplerConfig
from edsam_online.diffusion.fidelity import load_attribute_scorer, measure_fidelity
from edsam_online.diffusion.registry import default_cache_dir, load_sampler_ldm


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = SamplerConfig()
    p.add_argument("--model", default=d.model)
    p.add_argument("--n", type=int, default=200, help="real images (captions) per rho")
    p.add_argument("--rhos", type=float, nargs="+", default=[0.0, 0.2, 0.5, 1.0])
    p.add_argument("--guidance", type=float, default=d.guidance)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--inversion-steps", type=int, default=d.inversion_steps)
    p.add_argument("--deepcache-interval", type=int, default=d.deepcache_interval,
                   help="DeepCache for sampling (1 = off; needs the [deepcache] extra)")
    # 64: the batch of the recorded measurements (a UNet batch may round floats differently)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(a.threads)
    cfg = SamplerConfig(model=a.model, guidance=a.guidance, steps=a.steps, inversion_steps=a.inversion_steps,
                        batch_size=a.batch_size, deepcache_interval=a.deepcache_interval)
    scorer, accuracy = load_attribute_scorer(cfg.cache_dir or default_cache_dir(), cfg.resolution)
    ldm = load_sampler_ldm(cfg)
    t0 = time.time()
    res = measure_fidelity(ldm, scorer, cfg, rhos=a.rhos, n=a.n, seed=a.seed)
    print("measurer accuracy on held-out real source images: "
          + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()))
    print(f"model={ldm.model_id} steps={cfg.steps} inversion_steps={cfg.inversion_steps} guidance={cfg.guidance} "
          f"deepcache_interval={cfg.deepcache_interval} n={a.n}")
    print(f"{'setting':>8} {'class':>6} {'colour':>6} {'size':>6} {'all':>6} {'change':>6}")
    for setting, row in res.items():
        change = f"{row['change']:6.3f}" if "change" in row else f"{'':6}"
        print(f"{setting:>8} {row['class']:6.3f} {row['colour']:6.3f} {row['size']:6.3f} {row['all']:6.3f} {change}")
    print(json.dumps({"accuracy": accuracy, **res, "seconds": time.time() - t0}))


if __name__ == "__main__":
    main()
