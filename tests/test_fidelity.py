"""The fidelity measurers: accurate on real images, and they catch a sample that lost its colour."""

import numpy as np
import pytest
from PIL import Image

from edsam_online.data.domains import BASE_PALETTE
from edsam_online.data.shapes import CLASSES, SOURCE_DOMAIN, render_sample
from edsam_online.diffusion.fidelity import AttributeMeasurer, AttributeScorer, caption_attributes


@pytest.fixture(scope="module")
def measurer():
    return AttributeMeasurer.fit(32)


def test_measurers_are_accurate_on_held_out_real_images(measurer):
    assert measurer.accuracy(32) == {"colour": 1.0, "size": 1.0}
    blurred = measurer.accuracy(32, blur=1.0)  # a decoder's softness is not a colour or a size
    assert blurred["colour"] >= 0.95 and blurred["size"] >= 0.95, blurred


def recoloured(sample, colour):
    """The sample with its shape's pixels painted ``colour`` (the background kept)."""
    img = sample.image.astype(np.float32)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    shape = np.linalg.norm(img - np.median(border, 0), axis=-1) > 30
    out = sample.image.copy()
    out[shape] = BASE_PALETTE[colour]
    return out


def test_a_recoloured_shape_fails_the_colour_measurer_and_the_real_image_passes(measurer):
    for i in range(20):
        sample = render_sample(i, SOURCE_DOMAIN, 32, seed=5)
        other = "green" if sample.meta["color"] != "green" else "purple"
        colours, sizes = measurer.measure(np.stack([sample.image, recoloured(sample, other)]), [sample.meta["class"]] * 2)
        assert colours == [sample.meta["color"], other], (i, sample.caption)
        assert sizes == [sample.meta["size"]] * 2  # the shape itself is unchanged


def test_a_blank_image_shows_no_colour_or_size(measurer):
    colours, sizes = measurer.measure(np.full((1, 32, 32, 3), 230, np.uint8), ["circle"])
    assert colours == [None] and sizes == [None]


def test_captions_name_their_attributes():
    assert caption_attributes("a large pink heart on a light background") == {
        "class": "heart", "colour": "pink", "size": "large"}
    assert caption_attributes("a small heart in cyan") == {"class": "heart", "colour": "cyan", "size": "small"}
    # A real caption names none of the built-in attributes, or more than one of a kind.
    assert set(caption_attributes("Two dogs playing in the snow").values()) == {None}
    assert caption_attributes("a red circle and a blue square")["colour"] is None


class FixedClassifier:
    """Stands in for the trained CNN: predicts the given labels."""

    def __init__(self, labels):
        self.labels = np.asarray(labels)

    def predict(self, images):
        return self.labels[:len(images)]


def test_the_attribute_score_is_the_share_of_named_attributes_shown(measurer):
    samples = [render_sample(i, SOURCE_DOMAIN, 32, seed=5) for i in range(3)]
    images = np.stack([s.image for s in samples])
    labels = [s.meta["label"] for s in samples]
    wrong_class = (labels[1] + 1) % len(CLASSES)
    scorer = AttributeScorer(FixedClassifier([labels[0], wrong_class, labels[2]]), measurer)
    other = "green" if samples[2].meta["color"] != "green" else "purple"
    images[2] = recoloured(samples[2], other)
    captions = [s.caption for s in samples]
    agree = scorer.agreement(images, captions)
    assert agree["class"].tolist() == [True, False, True] and agree["colour"].tolist() == [True, True, False]
    assert agree["all"].tolist() == [True, False, False]
    np.testing.assert_allclose(scorer(images, captions), [1.0, 2 / 3, 2 / 3], rtol=1e-6)
    assert scorer(images[:1], ["Two dogs playing in the snow"]).tolist() == [0.0]


def test_clip_scorer_loads_a_checkpoint_file_and_scores_cosines_in_unit_range(tmp_path):
    import torch

    from edsam_online.diffusion.scoring import ClipScorer, build_scorer
    from edsam_online.models import ClipModelConfig, create_clip

    torch.manual_seed(0)
    model = create_clip(ClipModelConfig("edsam-tiny-rn"))[0].eval()
    torch.save(model.state_dict(), tmp_path / "clip.pt")
    scorer = ClipScorer("edsam-tiny-rn", str(tmp_path / "clip.pt"), batch_size=2)
    samples = [render_sample(i, SOURCE_DOMAIN, 32, seed=5) for i in range(3)]
    images, captions = np.stack([s.image for s in samples]), [s.caption for s in samples]
    scores = scorer(images, captions)
    assert scores.shape == (3,) and scores.dtype == np.float32 and ((scores >= 0) & (scores <= 1)).all()
    with torch.no_grad():  # the loaded weights are the saved ones: the same cosines
        x = torch.stack([scorer.preprocess(Image.fromarray(i)) for i in images])
        cos = (model.encode_image(x, normalize=True) * model.encode_text(scorer.tokenizer(captions), normalize=True)).sum(-1)
    np.testing.assert_allclose(scores, cos.clamp(0, 1).numpy(), atol=1e-5)
    from edsam_online.diffusion import SamplerConfig
    from edsam_online.producer import ProducerConfig

    assert build_scorer(ProducerConfig(), SamplerConfig()) is None
    clip = build_scorer(ProducerConfig(scorer="clip", scorer_model="edsam-tiny-rn",
                                       scorer_pretrained=str(tmp_path / "clip.pt")), SamplerConfig())
    np.testing.assert_allclose(clip(images, captions), scores, atol=1e-6)


def test_fidelity_report_has_every_setting_and_attribute(measurer):
    from edsam_online.diffusion import SamplerConfig
    from edsam_online.diffusion.fidelity import measure_fidelity
    from edsam_online.diffusion.registry import load_sampler_ldm

    cfg = SamplerConfig(model="tiny-random", steps=1, inversion_steps=1, batch_size=4)
    scorer = AttributeScorer(FixedClassifier(np.zeros(8, int)), measurer)
    res = measure_fidelity(load_sampler_ldm(cfg), scorer, cfg, rhos=(0.0, 0.5), n=8)
    assert list(res) == ["vae", "rho=0", "rho=0.5", "pure"]
    for setting, row in res.items():
        assert set(row) == {"class", "colour", "size", "all"} | ({"change"} if setting != "pure" else set())
        assert all(0.0 <= v <= 1.0 for v in row.values()) and row["all"] <= min(row["class"], row["colour"])
