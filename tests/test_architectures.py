"""``model="random:<hub id>"``: a published architecture from its stored configs, random weights."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel

from edsam_online.diffusion import SamplerConfig, build_sampler
from edsam_online.diffusion import architectures as arch
from edsam_online.diffusion import config as names

PAPER = "CompVis/ldm-text2im-large-256"
SD = "runwayml/stable-diffusion-v1-5"


def test_the_papers_generator_is_stored_with_its_published_sizes():
    assert PAPER in names.architectures()
    comps, layout = arch.random_components(PAPER, device="meta")  # no memory, no time
    assert layout == "compvis"
    assert isinstance(comps["unet"], UNet2DConditionModel) and isinstance(comps["vae"], AutoencoderKL)
    assert isinstance(comps["text_encoder"], LDMBertModel) and isinstance(comps["scheduler"], DDIMScheduler)
    # UNet 872.3M: the published unet/diffusion_pytorch_model.bin holds 3.49 GB of float32.
    # LDMBert 582.0M counts its unused 39.1M to_logits head.
    assert arch.parameter_counts(comps) == {"unet": 872_300_484, "vae": 83_653_863, "text_encoder": 581_994_042}
    assert comps["unet"].config.cross_attention_dim == comps["text_encoder"].config.d_model == 1280
    assert comps["unet"].config.sample_size * 2 ** (len(comps["vae"].config.block_out_channels) - 1) == 256
    tok = comps["tokenizer"]
    assert tok.vocab_size == comps["text_encoder"].config.vocab_size == 30522 and tok.model_max_length == 512
    ids = tok(["a small red star on a light background"], padding="max_length", max_length=77,
              return_tensors="pt").input_ids
    assert ids.shape == (1, 77) and int(ids.max()) < 30522


def test_stable_diffusion_v1_5_is_stored_with_its_published_sizes():
    """The sd_1gpu / sd_2gpu presets' generator, for speed and memory on a GPU without weights."""
    comps, layout = arch.random_components(SD, device="meta")
    assert layout == "sd"
    assert arch.parameter_counts(comps) == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    assert comps["unet"].config.cross_attention_dim == comps["text_encoder"].config.hidden_size == 768
    assert comps["unet"].config.sample_size * 2 ** (len(comps["vae"].config.block_out_channels) - 1) == 512
    ids = comps["tokenizer"](["a photo of a dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids.shape == (1, 77) and int(ids.max()) < 49408


def _scaled_down_copy(root):
    """The paper's configs at a size a test builds in a second (same classes, same layout)."""
    src, dst = arch.architecture_dir(PAPER), root / "test--small-ldm"
    shutil.copytree(src, dst)

    def edit(name, **changes):
        cfg = json.loads((dst / name).read_text())
        cfg.update(changes)
        (dst / name).write_text(json.dumps(cfg))

    edit("unet/config.json", block_out_channels=[32, 32, 64, 64], layers_per_block=1, cross_attention_dim=64,
         sample_size=8)
    edit("vqvae/config.json", block_out_channels=[32, 32, 32, 32], layers_per_block=1, sample_size=64)
    edit("bert/config.json", d_model=64, encoder_layers=1, num_hidden_layers=1, encoder_attention_heads=2,
         head_dim=32, encoder_ffn_dim=128, vocab_size=1000)
    return "test/small-ldm"


def test_a_random_model_name_builds_through_the_sampler(tmp_path, monkeypatch):
    name = _scaled_down_copy(tmp_path)
    monkeypatch.setattr(names, "ARCH_DIR", tmp_path)
    cfg = SamplerConfig(model=f"random:{name}", resolution=64, m=2, steps=2, inversion_steps=2, seed=3)
    sampler = build_sampler(cfg)
    assert sampler.ldm.layout == "compvis" and sampler.ldm.model_id == f"random:{name}-seed3"
    assert sampler.ldm.max_length == 77  # min(tokenizer 512, LDMBert positions 77), as the published model
    images = np.random.RandomState(0).randint(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    out = sampler.generate(images, ["a red star", "a blue ring"], ["a", "b"])
    assert out.images.shape == (4, 64, 64, 3)
    # the seed fixes the weights, and building leaves the caller's RNG where it was
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    again = build_sampler(cfg).ldm
    assert torch.rand(1) == before
    assert all(torch.equal(a, b) for a, b in zip(again.unet.parameters(), sampler.ldm.unet.parameters()))
    other = build_sampler(SamplerConfig(model=f"random:{name}", resolution=64, seed=4)).ldm
    assert not torch.equal(next(other.unet.parameters()), next(sampler.ldm.unet.parameters()))


def test_an_unknown_random_architecture_is_refused_naming_the_stored_ones():
    with pytest.raises(ValueError, match=r"^model: no stored architecture for 'random:CompVis/ldm-text2im-large-512'; "
                                         r"random-weight models: random:CompVis/ldm-text2im-large-256, random:runwayml/stable-diffusion-v1-5"):
        SamplerConfig(model="random:CompVis/ldm-text2im-large-512")
    assert names.random_architecture("retrained") is None and names.random_architecture(f"random:{PAPER}") == PAPER
