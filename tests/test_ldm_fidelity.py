"""The retrained LDM: a fast smoke test of the training entry point, and (slow) its class fidelity."""

import numpy as np
import pytest

from edsam_online.diffusion import SamplerConfig, build_sampler
from edsam_online.diffusion.registry import default_cache_dir, retrained_model_dir, retrained_model_id
from edsam_online.diffusion.train_ldm import TrainLDMConfig, train_ldm


def test_train_ldm_saves_sd_layout_loadable_as_retrained(tmp_path, monkeypatch):
    monkeypatch.setenv("EDSAM_CACHE", str(tmp_path))
    out = train_ldm(TrainLDMConfig(out_dir=str(retrained_model_dir(str(tmp_path))), num_train=64,
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


@pytest.mark.slow
@pytest.mark.timeout(30 * 60)  # training alone takes over 10 minutes on 2 cores
def test_retrained_ldm_is_class_faithful(tmp_path, monkeypatch):
    """The documented training command's model: >= 70% of its rho = 0 samples show their caption's class."""
    import torch

    from edsam_online.diffusion.fidelity import load_attribute_scorer, measure_fidelity
    from edsam_online.diffusion.registry import load_sampler_ldm

    monkeypatch.setenv("EDSAM_CACHE", str(tmp_path))
    torch.set_num_threads(2)
    cfg = SamplerConfig(model="retrained", batch_size=64)  # the batch of the documented measurements
    scorer, accuracy = load_attribute_scorer(default_cache_dir())
    assert min(accuracy.values()) >= 0.95, accuracy
    ldm = load_sampler_ldm(cfg)  # trains the retrained LDM into tmp_path
    res = measure_fidelity(ldm, scorer, cfg, rhos=(0.0,), n=200)
    assert res["rho=0"]["class"] >= 0.7, res
