"""Loading and saving latent diffusion models in the SD and CompVis layouts, offline."""

import json

import huggingface_hub.constants
import numpy as np
import pytest
import torch

from edsam_online.diffusion import EDSAMSampler, ModelNotAvailableError, SamplerConfig, build_tiny_ldm, load_ldm
from edsam_online.diffusion.tiny import offline_bert_tokenizer, offline_clip_tokenizer

CAPTIONS = ["a small red star on a light background", "a large blue ring on a white background"]


def _images(n=2, res=32, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (n, res, res, 3), dtype=np.uint8)


def _generate(ldm, seed=3):
    cfg = SamplerConfig(model="tiny-random", steps=2, inversion_steps=2, m=2, rho=0.5, guidance=2.0)
    return EDSAMSampler(ldm, cfg).generate(_images(), CAPTIONS, ["a", "b"], seed=seed)


@pytest.mark.parametrize("layout, vae_dir, text_dir", [("sd", "vae", "text_encoder"), ("compvis", "vqvae", "bert")])
def test_save_pretrained_round_trip_is_bit_identical(tmp_path, layout, vae_dir, text_dir):
    ldm = build_tiny_ldm(SamplerConfig(seed=1), layout=layout)
    before = _generate(ldm)
    ldm.save_pretrained(tmp_path)
    for sub in (vae_dir, text_dir, "unet", "tokenizer", "scheduler"):
        assert (tmp_path / sub).is_dir(), sub
    loaded = load_ldm(tmp_path)
    assert loaded.layout == layout
    after = _generate(loaded)
    assert np.array_equal(before.images, after.images)
    assert before.alpha.tolist() == after.alpha.tolist()
    # the same seed reproduces; another seed changes the samples
    assert np.array_equal(_generate(loaded).images, after.images)
    assert not np.array_equal(_generate(loaded, seed=4).images, after.images)


def test_folder_without_model_index_is_detected_from_subfolders(tmp_path):
    ldm = build_tiny_ldm(layout="compvis")
    ldm.save_pretrained(tmp_path)
    (tmp_path / "model_index.json").unlink()
    assert load_ldm(tmp_path).layout == "compvis"


def test_missing_weights_offline_raise_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotAvailableError, match="not found locally.*folder"):
        load_ldm("CompVis/ldm-text2im-large-256")
    # a folder whose weights are missing names the folder layouts too
    build_tiny_ldm().save_pretrained(tmp_path)
    for f in (tmp_path / "unet").iterdir():
        f.unlink()
    with pytest.raises(ModelNotAvailableError, match="Stable Diffusion layout"):
        load_ldm(tmp_path)
    with pytest.raises(ModelNotAvailableError, match="neither a model folder nor a hub id"):
        load_ldm(str(tmp_path / "does-not-exist"))


def test_unknown_layout_is_rejected(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DModel"]}))
    with pytest.raises(ModelNotAvailableError, match="layout"):
        load_ldm(tmp_path)


def test_offline_clip_tokenizer_matches_open_clip():
    import open_clip

    tok = offline_clip_tokenizer(max_length=77)
    text = "a small red star on a light background, 3 hexagons!"
    ids = tok(text).input_ids
    ref = open_clip.tokenize([text])[0]
    assert ids == ref[: len(ids)].tolist()
    assert tok.vocab_size == 49408


def test_offline_bert_tokenizer_covers_any_word():
    tok = offline_bert_tokenizer()
    ids = tok("a zigzag crescent").input_ids
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "a zigzag crescent"


def test_encode_decode_shapes_and_autocast_bf16_channels_last():
    ldm = build_tiny_ldm(SamplerConfig(dtype="bf16", channels_last=True))
    z = ldm.encode(_images())
    assert z.shape == (2, 4, 16, 16) and z.dtype == torch.float32
    out = ldm.decode(z)
    assert out.shape == (2, 32, 32, 3) and out.dtype == np.uint8
    res = _generate(ldm)
    assert res.images.shape == (4, 32, 32, 3) and res.images.dtype == np.uint8
    # bf16 autocast really ran in reduced precision: results differ from fp32 but stay close
    ref = _generate(build_tiny_ldm())
    diff = np.abs(res.images.astype(int) - ref.images.astype(int))
    assert diff.max() > 0 and diff.mean() < 8
