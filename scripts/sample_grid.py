"""Write a sample grid PNG as the paper's Fig. 5: real images in the first column, M transported
samples beside each, labelled with each sample's alpha and, with ``--measure``, the style the
world measurer sees and a check mark where the sample keeps its caption's class, colour and size.

    python scripts/sample_grid.py --out grid.png [--model retrained] [--rows 6] [--m 6] [--rho R] [--measure]
    python scripts/sample_grid.py --out mine.png --model /models/stable-diffusion-v1-5 --resolution 512 \
        --data-kind webdataset --data-path '/data/mine/{00000..00099}.tar'      # your data, your generator

The real images are the built-in source domain, or the first ``--rows`` of your data
(``--data-kind webdataset|csv|imagefolder --data-path ...``, read as ``data.*`` reads them).
"""

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import itertools  # noqa: E402

from edsam_online.data import RealDataConfig, iter_real_samples  # noqa: E402
from edsam_online.data.shapes import SOURCE_DOMAIN, render_sample  # noqa: E402
from edsam_online.diffusion import SamplerConfig, build_sampler  # noqa: E402


def main(argv=None) -> plt.Figure:
    """Draw and save the grid; returns its figure (row i: real image i, then its samples)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = SamplerConfig()
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--model", default=d.model)
    p.add_argument("--rows", type=int, default=6, help="real images (one per row)")
    p.add_argument("--m", type=int, default=6, help="transported samples per real image")
    p.add_argument("--rho", type=float, default=d.rho)
    p.add_argument("--mode", default=d.mode)
    p.add_argument("--guidance", type=float, default=d.guidance)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--timestep-spacing", default=d.timestep_spacing)
    p.add_argument("--measure", action="store_true",
                   help="label each sample with its measured style and whether its caption holds")
    p.add_argument("--resolution", type=int, default=d.resolution)
    # 64: the batch docs/sample_grid.png was drawn with (a UNet batch may round floats differently)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--data-seed", type=int, default=7)
    p.add_argument("--data-kind", default="builtin", choices=("builtin", "webdataset", "csv", "imagefolder"))
    p.add_argument("--data-path", help="your shards, CSV or image folder (with --data-kind)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    cfg = SamplerConfig(model=a.model, rho=a.rho, m=a.m, mode=a.mode, guidance=a.guidance, steps=a.steps,
                        inversion_steps=a.steps, timestep_spacing=a.timestep_spacing, resolution=a.resolution,
                        batch_size=a.batch_size)
    sampler = build_sampler(cfg)
    if a.data_kind == "builtin":
        real = [render_sample(i, SOURCE_DOMAIN, a.resolution, a.data_seed) for i in range(a.rows)]
    else:
        data = RealDataConfig(kind=a.data_kind, path=a.data_path, resolution=a.resolution, shuffle=False)
        real = list(itertools.islice(iter_real_samples(data), a.rows))
    out = sampler.generate(np.stack([r.image for r in real]), [r.caption for r in real],
                           [r.key for r in real], seed=a.seed)
    labels = [""] * len(out.images)
    if a.measure:
        from edsam_online.diffusion.fidelity import load_attribute_scorer
        from edsam_online.diffusion.registry import default_cache_dir

        scorer = load_attribute_scorer(cfg.cache_dir or default_cache_dir(), cfg.resolution)[0]
        captions = [real[k // a.m].caption for k in range(len(out.images))]
        kept = scorer.agreement(out.images, captions)["all"]
        labels = [f"\n{style}{' ✓' if ok else ' ✗'}" for style, ok in zip(scorer.styles(out.images), kept)]
    fig, axes = plt.subplots(a.rows, a.m + 1, figsize=(1.3 * (a.m + 1), 1.45 * a.rows), squeeze=False)
    for i, r in enumerate(real):
        axes[i, 0].imshow(r.image)
        axes[i, 0].set_title("real", fontsize=7)
        axes[i, 0].set_ylabel(r.caption.replace(" on a ", "\non a "), fontsize=5, rotation=0, ha="right", va="center")
        for j in range(a.m):
            k = i * a.m + j
            axes[i, j + 1].imshow(out.images[k])
            axes[i, j + 1].set_title(f"α={out.alpha[k]:+.2f}{labels[k]}", fontsize=6)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"ED-SAM transport ({sampler.ldm.model_id}, mode={a.mode}, ρ={a.rho}, {a.steps} DDIM steps, "
                 f"{sampler.ldm.scheduler.config.timestep_spacing} spacing, guidance {a.guidance})", fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out, dpi=150)
    print(a.out)
    return fig


if __name__ == "__main__":
    main()
