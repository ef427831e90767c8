"""CLIP models come from open_clip, tiny presets included, and load back through `pretrained=`."""

import pytest
import torch

from edsam_online.models import ClipModelConfig, create_clip, model_names, register_tiny_models


def test_tiny_preset_builds_through_open_clip_and_encodes():
    model, _, preprocess_val, tokenizer = create_clip(ClipModelConfig(name="edsam-tiny"))
    images = torch.rand(2, 3, 32, 32)
    text = tokenizer(["a small red star", "a large blue ring"])
    img_f, txt_f, logit_scale = model(images, text)
    assert img_f.shape == txt_f.shape == (2, 64)
    assert torch.allclose(img_f.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-4)


def test_saved_checkpoint_loads_back_through_pretrained_path(tmp_path):
    torch.manual_seed(0)
    model, *_ , tokenizer = create_clip(ClipModelConfig(name="edsam-tiny"))
    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    loaded, *_ = create_clip(ClipModelConfig(name="edsam-tiny", pretrained=str(path)))
    model.eval(), loaded.eval()
    images, text = torch.rand(3, 3, 32, 32), tokenizer(["a", "b", "c"])
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), loaded.encode_image(images))
        assert torch.equal(model.encode_text(text), loaded.encode_text(text))


def test_the_names_a_config_accepts_are_the_ones_open_clip_lists():
    import open_clip

    register_tiny_models()
    assert model_names() == set(open_clip.list_models())
    assert {"edsam-tiny", "edsam-tiny-rn", "ViT-B-16", "RN50"} <= model_names()


def test_unknown_model_name_is_rejected_with_the_key():
    with pytest.raises(ValueError, match="name: unknown open_clip model 'ViT-Huge-999'"):
        ClipModelConfig(name="ViT-Huge-999")


def test_missing_pretrained_tag_offline_gives_a_clear_error():
    with pytest.raises(RuntimeError, match="model.pretrained='no-such-tag'"):
        create_clip(ClipModelConfig(name="edsam-tiny", pretrained="no-such-tag"))
