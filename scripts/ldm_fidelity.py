"""Fidelity of an LDM's samples across styles, and the frontier the sampler preset is chosen on.

    python scripts/ldm_fidelity.py [--model retrained] [--n 200] [--rhos 0 0.25 ... 1.5]
        [--steps 5] [--guidance 3] [--timestep-spacing trailing] [--json OUT] [--plot OUT.png]
    python scripts/ldm_fidelity.py --n 200 --steps 5 10 --guidance 2 3 --timestep-spacing leading trailing

Loads the world measurer of :mod:`edsam_online.diffusion.fidelity` (fitted on renders of every
style of the generator's world; it ships with the package, and a changed recipe trains and
caches its own) and prints each head's held-out accuracy. Then, for
each sampler setting (every combination of ``--steps``, ``--guidance`` and
``--timestep-spacing``; the inversion uses the same step count), it prints the share of
samples that keep their caption's class, colour, size and all three, and the share outside
the ``flat`` style, for the VAE's reconstructions, ``identity`` (``z_t = z_s``), every rho and
pure sampling, all from ``flat`` sources and captions. Last, the frontier (off-style share
against content kept, over rho) and the point with the most off-style samples among those that
keep the class in at least 90% and the colour in at least 85%: the preset is chosen there, on
fidelity alone; where no point does, the point with at least 25% off-style samples that keeps
the most content (``fallback_on_frontier``). The retrained LDM is trained first if it is not cached yet.
"""

import argparse
import itertools
import json
import logging
import time

import torch

from edsam_online.diffusion import SamplerConfig
from edsam_online.diffusion.fidelity import (best_on_frontier, fallback_on_frontier, frontier, load_attribute_scorer,
                                             measure_fidelity)
from edsam_online.diffusion.registry import default_cache_dir, load_sampler_ldm

COLUMNS = ("class", "colour", "size", "all", "off_style", "change")


def setting_label(steps: int, guidance: float, spacing: str) -> str:
    return f"steps={steps} guidance={guidance:g} spacing={spacing}"


def plot_frontier(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, kept in zip(axes, ("class", "all")):
        for setting, result in results.items():
            points = frontier(result)
            ax.plot([row[kept] for _, row in points], [row["off_style"] for _, row in points], "o-", label=setting)
            for rho, row in points:
                ax.annotate(f"{rho:g}", (row[kept], row["off_style"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.set_xlabel(f"{kept} kept" if kept != "all" else "class, colour and size kept")
        ax.grid(alpha=0.3)
    axes[0].axvline(0.90, color="grey", ls=":")
    axes[0].set_ylabel("share outside the flat style")
    axes[0].axhline(0.25, color="grey", ls=":")
    axes[1].legend(fontsize=7)
    fig.suptitle("transport sampler from flat sources, over rho (labels)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = SamplerConfig()
    p.add_argument("--model", default=d.model)
    p.add_argument("--n", type=int, default=200, help="flat sources (and captions) per setting")
    p.add_argument("--rhos", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5])
    p.add_argument("--steps", type=int, nargs="+", default=[d.steps], help="DDIM steps (inversion and sampling)")
    p.add_argument("--guidance", type=float, nargs="+", default=[d.guidance])
    p.add_argument("--timestep-spacing", nargs="+", default=[d.timestep_spacing],
                   help="leading | trailing | linspace (default: the model's own)")
    p.add_argument("--deepcache-interval", type=int, default=d.deepcache_interval,
                   help="DeepCache for sampling (1 = off; needs the [deepcache] extra)")
    # 64: the batch of the recorded measurements (a UNet batch may round floats differently)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write every measurement here")
    p.add_argument("--plot", help="draw the frontier into this PNG")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(a.threads)
    base = SamplerConfig(model=a.model, batch_size=a.batch_size, deepcache_interval=a.deepcache_interval)
    scorer, accuracy = load_attribute_scorer(base.cache_dir or default_cache_dir(), base.resolution)
    print("measurer accuracy on held-out world renders (every style): "
          + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()), flush=True)
    results, ldms = {}, {}
    t0 = time.time()
    for steps, guidance, spacing in itertools.product(a.steps, a.guidance, a.timestep_spacing):
        cfg = SamplerConfig(model=a.model, steps=steps, inversion_steps=steps, guidance=guidance,
                            timestep_spacing=spacing, batch_size=a.batch_size, deepcache_interval=a.deepcache_interval)
        if spacing not in ldms:
            ldms[spacing] = load_sampler_ldm(cfg)
        ldm = ldms[spacing]
        label = setting_label(steps, guidance, ldm.scheduler.config.timestep_spacing)
        results[label] = res = measure_fidelity(ldm, scorer, cfg, rhos=a.rhos, n=a.n, seed=a.seed)
        print(f"\nmodel={ldm.model_id} {label} deepcache_interval={cfg.deepcache_interval} n={a.n}")
        print(f"{'setting':>9} " + " ".join(f"{c:>9}" for c in COLUMNS))
        for setting, row in res.items():
            print(f"{setting:>9} " + " ".join(f"{row[c]:9.3f}" if c in row else f"{'':9}" for c in COLUMNS))
    print("\nfrontier (rho: class kept, all kept, off-style)")
    for label, res in results.items():
        print(f"  {label}: " + "; ".join(f"{rho:g}: {row['class']:.2f}, {row['all']:.2f}, {row['off_style']:.2f}"
                                         for rho, row in frontier(res)))
    def point(p):
        row = results[p[0]][f"rho={p[1]:g}"]
        return f"{p[0]} rho={p[1]:g} (class {row['class']:.3f}, all {row['all']:.3f}, off-style {row['off_style']:.3f})"

    best = best_on_frontier(results)
    print("preset: most off-style point keeping class >= 0.90 and colour >= 0.85: " + (point(best) if best else "none"))
    fallback = None if best else fallback_on_frontier(results)
    if not best:
        print("preset where none does: most content kept with >= 25% off-style: "
              + (point(fallback) if fallback else "none"))
    if a.plot:
        plot_frontier(results, a.plot)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"accuracy": accuracy, "n": a.n, "results": results, "best": best, "fallback": fallback,
                       "seconds": time.time() - t0}, f, indent=1)
    return results, accuracy


if __name__ == "__main__":
    main()
