#!/usr/bin/env python
"""Write built-in shapes data to disk: webdataset shards and/or ImageFolder trees.

Shards follow the img2dataset layout: tar files 00000.tar, 00001.tar, ... holding
`<key>.jpg|png` (image), `<key>.txt` (caption) and `<key>.json` (key, caption, class,
label, color, size, domain, seed, index). One folder of shards per domain:
`<webdataset>/<domain>/00000.tar`. ImageFolder trees (torchvision layout):
`<imagefolder>/<domain>/<class>/<key>.png`, or `<imagefolder>/<class>/<key>.png` when
a single domain is written.

    python scripts/make_shards.py --webdataset data/wds --imagefolder data/folders \\
        --domains flat sketch --per-domain 1000 --resolution 64
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import webdataset as wds
from PIL import Image

from edsam_online.data.domains import BUILTIN_DOMAINS
from edsam_online.data.shapes import DOMAINS, render_sample


def _encode(image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        Image.fromarray(image).save(buf, format="JPEG", quality=95)
    else:
        Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def write_webdataset(out: Path, domain: str, n: int, resolution: int, seed: int,
                     image_format: str = "jpg", shard_size: int = 1000) -> list[Path]:
    """Write `n` samples of `domain` as shards under out/<domain>/; returns the shard paths."""
    folder = out / domain
    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / "%05d.tar"), maxcount=shard_size, verbose=0) as sink:
        for index in range(n):
            s = render_sample(index, domain, resolution, seed)
            key = f"{index:09d}"  # img2dataset-style numeric keys (no dots: webdataset splits on them)
            sink.write({"__key__": key, image_format: _encode(s.image, image_format), "txt": s.caption,
                        "json": {"key": key, "caption": s.caption, **s.meta}})
    return sorted(folder.glob("*.tar"))


def write_imagefolder(root: Path, domain: str, n: int, resolution: int, seed: int) -> int:
    """Write `n` PNGs of `domain` as root/<class>/<key>.png; returns the count."""
    for index in range(n):
        s = render_sample(index, domain, resolution, seed)
        folder = root / s.meta["class"]  # only classes that occur: ImageFolder rejects empty class folders
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(s.image).save(folder / f"{s.key}.png")
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--webdataset", type=Path, help="output folder for webdataset shards")
    p.add_argument("--imagefolder", type=Path, help="output folder for ImageFolder trees")
    p.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=BUILTIN_DOMAINS,
                   help="evaluation domains (default), world styles, or world (the generator's corpus)")
    p.add_argument("--per-domain", type=int, default=1000, help="samples per domain")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("jpg", "png"), default="jpg", help="image format inside shards")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    args = p.parse_args(argv)
    if args.webdataset is None and args.imagefolder is None:
        p.error("give --webdataset and/or --imagefolder")
    for name in ("per_domain", "resolution", "shard_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.seed < 0:
        p.error("--seed must be >= 0")
    for domain in args.domains:
        if args.webdataset is not None:
            shards = write_webdataset(args.webdataset, domain, args.per_domain, args.resolution, args.seed,
                                      args.format, args.shard_size)
            print(f"webdataset: {args.per_domain} samples of '{domain}' in {len(shards)} shard(s): "
                  f"{shards[0].parent}/{{{shards[0].stem}..{shards[-1].stem}}}.tar")
        if args.imagefolder is not None:
            root = args.imagefolder / domain if len(args.domains) > 1 else args.imagefolder
            write_imagefolder(root, domain, args.per_domain, args.resolution, args.seed)
            print(f"imagefolder: {args.per_domain} images of '{domain}' in {root}/<class>/*.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
