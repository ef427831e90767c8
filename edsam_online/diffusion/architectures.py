"""Published generator architectures with random weights: ``model="random:<hub id>"``.

A generator's throughput does not depend on its weights. ``random:CompVis/ldm-text2im-large-256``
builds the paper's generator (UNet 872M, KL-f8 VAE 84M, LDMBert 582M parameters) from its
component configs stored in ``arch/<owner>--<name>/`` (the hub repository's folder layout,
one ``config.json`` per component and ``model_index.json``; its README says where each file
came from), with seeded random weights, into the same :class:`LatentDiffusion` a loaded model
uses. A benchmark, a producer or a GPU check can then run the paper-scale generator on any
machine, with nothing downloaded. Its samples are noise: use it to measure speed and memory,
never to train on.

The tokenizer is built here with the published vocabulary size and maximum length (a BERT
word-piece or CLIP BPE tokenizer, :mod:`edsam_online.diffusion.tiny`): token ids only have
to be valid for the embedding table, which is random anyway.

Weights are drawn on the CPU from ``torch.manual_seed(seed)`` (the caller's RNG state is left
as it was), so a seed gives the same model on every machine; ``device="meta"`` builds the
modules without memory (parameter counts, tests).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

import edsam_online.diffusion.config as names
from edsam_online.diffusion.config import SamplerConfig
from edsam_online.diffusion.pipeline import _TEXT_CLASSES, _VAE_CLASSES, LAYOUTS, LatentDiffusion, detect_layout



def architecture_dir(hub_id: str) -> Path:
    return names.ARCH_DIR / hub_id.replace("/", "--", 1)


def _json(folder: Path, name: str) -> dict:
    return json.loads((folder / name).read_text())


def _tokenizer(folder: Path, text_config):
    from edsam_online.diffusion.tiny import offline_bert_tokenizer, offline_clip_tokenizer

    cfg = _json(folder, "tokenizer/tokenizer_config.json")
    max_length = int(cfg["model_max_length"])
    kind = cfg.get("tokenizer_class")
    if kind == "BertTokenizer":
        return offline_bert_tokenizer(max_length=max_length, vocab_size=int(text_config.vocab_size))
    if kind == "CLIPTokenizer":
        return offline_clip_tokenizer(max_length=max_length)
    raise ValueError(f"{folder}: no offline tokenizer for tokenizer_class {kind!r} (BertTokenizer, CLIPTokenizer)")


def random_components(hub_id: str, seed: int = 0, device: str | torch.device = "cpu") -> tuple[dict, str]:
    """(components, layout) of ``hub_id``'s architecture with random weights drawn from ``seed``."""
    folder = architecture_dir(hub_id)
    index = _json(folder, "model_index.json")
    layout = detect_layout(index)
    vae_dir, text_dir = LAYOUTS[layout]
    vae_cls = _VAE_CLASSES[index[vae_dir][1]]
    text_cls = _TEXT_CLASSES[index[text_dir][1]]
    text_config = text_cls.config_class.from_dict(_json(folder, f"{text_dir}/config.json"))
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        comps = dict(
            vae=vae_cls.from_config(_json(folder, f"{vae_dir}/config.json")),
            unet=UNet2DConditionModel.from_config(_json(folder, "unet/config.json")),
            text_encoder=text_cls(text_config),
        )
    comps["tokenizer"] = _tokenizer(folder, text_config)
    comps["scheduler"] = DDIMScheduler.from_config(_json(folder, "scheduler/scheduler_config.json"))
    return comps, layout


def parameter_counts(comps: dict) -> dict[str, int]:
    """Parameters of each network (``unet``, ``vae``, ``text_encoder``)."""
    return {k: sum(p.numel() for p in comps[k].parameters()) for k in ("unet", "vae", "text_encoder")}


def build_random_ldm(hub_id: str, cfg: SamplerConfig) -> LatentDiffusion:
    """``hub_id``'s architecture with random weights drawn from ``cfg.seed``, run as ``cfg`` says."""
    comps, layout = random_components(hub_id, seed=cfg.seed)
    return LatentDiffusion(comps["vae"], comps["unet"], comps["text_encoder"], comps["tokenizer"],
                           comps["scheduler"].config, model_id=f"{names.RANDOM_PREFIX}{hub_id}-seed{cfg.seed}",
                           layout=layout, cfg=cfg)
