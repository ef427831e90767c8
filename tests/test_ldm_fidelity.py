"""The retrained world LDM: a fast smoke test of the training entry point, its samples leave the
source style, and (slow) its fidelity bars and bit-for-bit reproduction."""

import numpy as np
import pytest

from edsam_online.diffusion import SamplerConfig, build_sampler, registry
from edsam_online.diffusion.registry import default_cache_dir, retrained_model_dir, retrained_model_id
from edsam_online.diffusion.train_ldm import TrainLDMConfig, train_ldm


def test_train_ldm_saves_sd_layout_loadable_as_retrained(tmp_path, monkeypatch):
    monkeypatch.setenv("EDSAM_CACHE", str(tmp_path))
    monkeypatch.setattr(registry, "SHIPPED_DIR", tmp_path / "nothing-shipped")
    out = train_ldm(TrainLDMConfig(out_dir=str(retrained_model_dir(str(tmp_path), 32)), num_train=64,
                                   vae_steps=2, unet_steps=2, batch_size=8, num_threads=1))
    for sub in ("vae", "unet", "text_encoder", "tokenizer", "scheduler"):
        assert (out / sub).is_dir()
    # "retrained" finds the cached model instead of training again
    sampler = build_sampler(SamplerConfig(model="retrained", steps=2, inversion_steps=2, m=2))
    assert sampler.ldm.model_id == out.name == retrained_model_id(32)
    res = sampler.generate(np.zeros((1, 32, 32, 3), np.uint8), ["a small red star"], ["k"])
    assert res.images.shape == (2, 32, 32, 3)


@pytest.mark.parametrize("field, value",
                         [("out_dir", ""), ("vae_steps", 0), ("caption_dropout", 1.0), ("resolution", 30)])
def test_train_config_validation(field, value):
    with pytest.raises(ValueError, match=field):
        TrainLDMConfig(**{"out_dir": "out", field: value})


def test_the_shipped_generator_is_the_current_recipe_and_loads_without_training(tmp_path, monkeypatch):
    """The main job's generator ships with the package: in the SD layout, at most 20 MB, of the
    recipe and data the code trains today (else "retrained" would train a new one), loaded by
    from_pretrained."""
    import json

    import torch
    from safetensors.torch import load_file

    from edsam_online.diffusion.train_ldm import data_fingerprint, load_corpus, recipe_version

    shipped = sorted(p.name for p in registry.SHIPPED_DIR.iterdir() if p.is_dir())
    assert shipped == [retrained_model_id(32)]
    folder = registry.SHIPPED_DIR / shipped[0]
    recorded = json.loads((folder / "train_ldm_config.json").read_text())
    assert recorded["version"] == recipe_version(TrainLDMConfig(out_dir="-"))
    # the world corpus renders today to the very pixels and captions the model was trained on
    assert recorded["data_fingerprint"] == data_fingerprint(*load_corpus(TrainLDMConfig(out_dir="-")))
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) <= 20 * 2**20
    assert {t.dtype for t in load_file(folder / "unet" / "diffusion_pytorch_model.safetensors").values()} \
        == {torch.float16}  # stored in half precision ...
    monkeypatch.setenv("EDSAM_CACHE", str(tmp_path))
    ldm = registry.load_sampler_ldm(SamplerConfig(model="retrained"))
    assert ldm.model_id == folder.name and not any(tmp_path.iterdir())  # nothing trained or cached
    assert {p.dtype for m in (ldm.vae, ldm.unet, ldm.text_encoder) for p in m.parameters()} == {torch.float32}


def test_a_flat_captions_pure_samples_spread_over_more_than_one_style():
    """The shipped generator's prior is wider than the source: sampled from noise under one
    style-free caption of the source, some samples have a plain background and others a busy
    one (texture, clutter, pattern), the border rule below; no trained measurer needed."""
    import torch

    from _styles import border_stats

    ldm = registry.load_sampler_ldm(SamplerConfig(model="retrained"))
    cfg = SamplerConfig()
    cond = ldm.embed(["a medium red circle"] * 48)
    z = torch.randn((48, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    images = ldm.decode(ldm.sample(z, cond, cfg.steps, cfg.guidance))
    _, spread = border_stats(images)
    plain, busy = (spread < 15).mean(), (spread >= 25).mean()
    assert plain >= 0.1 and busy >= 0.1, (plain, busy)


@pytest.mark.slow
@pytest.mark.timeout(150 * 60)  # the recipe trains in at most 2 hours on 2 cores
def test_the_documented_command_reproduces_the_shipped_generator_bit_for_bit(tmp_path):
    from edsam_online.diffusion.train_ldm import main

    main(["--out", str(tmp_path / "m")])
    shipped = registry.SHIPPED_DIR / retrained_model_id(32)
    files = sorted(str(p.relative_to(shipped)) for p in shipped.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(tmp_path / "m")) for p in (tmp_path / "m").rglob("*") if p.is_file())
    for name in files:
        assert (shipped / name).read_bytes() == (tmp_path / "m" / name).read_bytes(), name


@pytest.mark.slow
@pytest.mark.timeout(60 * 60)
@pytest.mark.xfail(strict=True, reason="the shipped world model keeps the class in 0.71 of its samples at the "
                   "preset (33% off-style): no point of its frontier meets the class bar (BENCHMARKS.md)")
def test_the_main_jobs_generator_leaves_the_source_style_and_keeps_what_its_captions_say():
    """The bars at the sampler preset (SamplerConfig's defaults), n = 500 flat sources: every
    measurer head at least 0.95 on held-out world renders; at the preset's rho class kept
    >= 0.90, colour kept >= 0.85 and at least 25% of samples outside the flat style, while
    identity (z_t = z_s) puts at most 5% outside it."""
    import torch

    from edsam_online.diffusion.fidelity import load_attribute_scorer, measure_fidelity
    from edsam_online.diffusion.registry import load_sampler_ldm

    torch.set_num_threads(2)
    cfg = SamplerConfig(model="retrained", batch_size=64)  # the batch of the documented measurements
    scorer, accuracy = load_attribute_scorer(default_cache_dir(), 32)
    assert min(accuracy.values()) >= 0.95, accuracy
    res = measure_fidelity(load_sampler_ldm(cfg), scorer, cfg, rhos=(cfg.rho,), n=500)
    at_preset = res[f"rho={cfg.rho:g}"]
    assert at_preset["class"] >= 0.90 and at_preset["colour"] >= 0.85, res
    assert at_preset["off_style"] >= 0.25, res
    assert res["identity"]["off_style"] <= 0.05, res
