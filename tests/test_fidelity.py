"""The fidelity scorer: the share of a caption's attributes a sample shows, its style, and the frontier."""

import numpy as np
import pytest
from PIL import Image

from edsam_online.data.domains import WORLD_STYLES
from edsam_online.data.shapes import CLASSES, COLORS, SIZES, SOURCE_DOMAIN, render_sample
from edsam_online.diffusion.fidelity import (HEADS, AttributeScorer, WorldMeasurer, best_on_frontier,
                                             caption_attributes, fallback_on_frontier, train_measurer,
                                             world_renders)


def test_captions_name_their_attributes():
    assert caption_attributes("a large pink heart on a light background") == {
        "class": "heart", "colour": "pink", "size": "large"}
    assert caption_attributes("a small heart in cyan") == {"class": "heart", "colour": "cyan", "size": "small"}
    assert caption_attributes("a small red ring on a textured surface")["colour"] == "red"  # not "textu-red"
    # A real caption names none of the built-in attributes, or more than one of a kind.
    assert set(caption_attributes("Two dogs playing in the snow").values()) == {None}
    assert caption_attributes("a red circle and a blue square")["colour"] is None


class FixedMeasurer:
    """Stands in for the trained measurer: predicts the given label names per head."""

    def __init__(self, **names):
        self.labels = {head: np.array([HEADS[head].index(v) for v in values]) for head, values in names.items()}

    def predict(self, images):
        return {head: v[:len(images)] for head, v in self.labels.items()}


def test_the_score_is_the_share_of_named_attributes_shown_and_off_style_is_outside_flat():
    captions = ["a small red star", "a large blue ring on a light background", "a medium green cross"]
    scorer = AttributeScorer(FixedMeasurer(**{
        "class": ["star", "circle", "cross"], "colour": ["red", "blue", "yellow"], "size": ["small", "large", "medium"],
        "style": ["flat", "photo", "texture"]}))
    images = np.zeros((3, 32, 32, 3), np.uint8)
    agree = scorer.agreement(images, captions)
    assert agree["class"].tolist() == [True, False, True] and agree["colour"].tolist() == [True, True, False]
    assert agree["all"].tolist() == [True, False, False]
    assert agree["off_style"].tolist() == [False, True, True]
    assert scorer.styles(images) == ["flat", "photo", "texture"]
    np.testing.assert_allclose(scorer(images, captions), [1.0, 2 / 3, 2 / 3], rtol=1e-6)
    assert scorer(images[:1], ["Two dogs playing in the snow"]).tolist() == [0.0]


def test_the_measurer_trains_on_every_world_style_and_reports_each_heads_held_out_accuracy():
    images, labels = world_renders(14, 32)
    assert sorted(labels["style"].tolist()) == sorted(list(range(len(WORLD_STYLES))) * 2)
    assert set(labels) == set(HEADS) == {"class", "colour", "size", "style"}
    assert HEADS["class"] == CLASSES and HEADS["colour"] == COLORS and HEADS["size"] == tuple(SIZES)
    model, accuracy = train_measurer(32, {"revision": 0, "n": 70, "steps": 2, "batch": 8, "lr": 1e-3, "seed": 0})
    assert isinstance(model, WorldMeasurer) and set(accuracy) == set(HEADS)
    assert all(0.0 <= v <= 1.0 for v in accuracy.values())
    predicted = model.predict(images)
    assert all(predicted[h].shape == (14,) and predicted[h].max() < len(HEADS[h]) for h in HEADS)


def test_the_shipped_measurer_is_of_the_current_recipe_and_reads_held_out_renders(tmp_path):
    from edsam_online.diffusion import fidelity

    shipped = fidelity.MEASURER_DIR / fidelity.measurer_file_name(32)
    assert shipped.is_file()  # a changed recipe trains into the cache on first use: copy that file here to ship it
    model, accuracy = fidelity.load_or_train_measurer(str(tmp_path), 32)  # an empty cache: nothing is trained
    assert not list(tmp_path.iterdir()) and min(accuracy.values()) >= 0.95
    images, labels = world_renders(350, 32, start=fidelity.MEASURER_RECIPE["n"])  # held out, 50 per style
    assert model.accuracy(images, labels)["class"] >= 0.9


def test_a_measurer_of_another_recipe_is_trained_into_the_cache_once_and_read_back_without_pickle(tmp_path,
                                                                                                   monkeypatch):
    from edsam_online.diffusion import fidelity

    monkeypatch.setattr(fidelity, "MEASURER_RECIPE", {"revision": 0, "n": 70, "steps": 2, "batch": 8, "lr": 1e-3,
                                                      "seed": 0})
    monkeypatch.setattr(fidelity, "train_measurer",
                        lambda res, recipe=None, real=fidelity.train_measurer: real(res, fidelity.MEASURER_RECIPE))
    first, accuracy = fidelity.load_or_train_measurer(str(tmp_path), 32)
    (cached,) = tmp_path.iterdir()
    assert cached.name == fidelity.measurer_file_name(32)
    assert cached.read_bytes()[8:9] == b"{"  # a safetensors JSON header, no pickle
    monkeypatch.setattr(fidelity, "train_measurer", None)  # a second call must not train
    again, same = fidelity.load_or_train_measurer(str(tmp_path), 32)
    images, _ = world_renders(14, 32)
    assert same == accuracy and all(np.array_equal(a, b) for a, b in zip(first.predict(images).values(),
                                                                          again.predict(images).values()))


def test_the_preset_point_is_the_most_off_style_one_that_keeps_class_and_colour():
    def row(cls, colour, off):
        return {"class": cls, "colour": colour, "size": 1.0, "all": min(cls, colour), "off_style": off}

    results = {
        "a": {"vae": row(1, 1, 0), "rho=0.5": row(0.95, 0.95, 0.2), "rho=1": row(0.91, 0.90, 0.3),
              "rho=1.5": row(0.80, 0.90, 0.6)},
        "b": {"rho=0.5": row(0.93, 0.84, 0.5), "rho=1": row(0.92, 0.86, 0.28), "pure": row(0.5, 0.5, 0.9)},
    }
    assert best_on_frontier(results) == ("a", 1.0)  # b's 0.5 keeps too little colour; pure is not on it
    assert best_on_frontier(results, min_class=0.99) is None


def test_without_a_point_meeting_the_bars_the_preset_keeps_the_most_content_at_25_percent_off_style():
    def row(cls, all_, off):
        return {"class": cls, "colour": 1.0, "size": 1.0, "all": all_, "off_style": off}

    results = {
        "a": {"rho=0.5": row(0.80, 0.78, 0.20), "rho=0.75": row(0.70, 0.65, 0.28), "rho=1": row(0.60, 0.50, 0.45)},
        "b": {"rho=0.75": row(0.72, 0.61, 0.32), "rho=1": row(0.55, 0.45, 0.50), "pure": row(0.4, 0.4, 0.9)},
    }
    assert best_on_frontier(results) is None
    assert fallback_on_frontier(results) == ("a", 0.75)  # a's 0.5 is not off-style enough; b's 0.75 keeps less
    assert fallback_on_frontier(results, min_off_style=0.6) is None


def test_clip_scorer_loads_a_checkpoint_file_and_scores_cosines_in_unit_range(tmp_path):
    import torch

    from edsam_online.diffusion.scoring import ClipScorer, build_scorer
    from edsam_online.models import ClipModelConfig, create_clip

    torch.manual_seed(0)
    model = create_clip(ClipModelConfig("edsam-tiny-rn"))[0].eval()
    torch.save(model.state_dict(), tmp_path / "clip.pt")
    scorer = ClipScorer("edsam-tiny-rn", str(tmp_path / "clip.pt"), batch_size=2)
    samples = [render_sample(i, SOURCE_DOMAIN, 32, 5) for i in range(3)]
    images, captions = np.stack([s.image for s in samples]), [s.caption for s in samples]
    scores = scorer(images, captions)
    assert scores.shape == (3,) and scores.dtype == np.float32 and ((scores >= 0) & (scores <= 1)).all()
    with torch.no_grad():  # the loaded weights are the saved ones: the same cosines
        x = torch.stack([scorer.preprocess(Image.fromarray(i)) for i in images])
        cos = (model.encode_image(x, normalize=True) * model.encode_text(scorer.tokenizer(captions), normalize=True)).sum(-1)
    np.testing.assert_allclose(scores, cos.clamp(0, 1).numpy(), atol=1e-5)
    from edsam_online.diffusion import SamplerConfig

    assert build_scorer("none", SamplerConfig()) is None
    clip = build_scorer("clip", SamplerConfig(), "edsam-tiny-rn", str(tmp_path / "clip.pt"))
    np.testing.assert_allclose(clip(images, captions), scores, atol=1e-6)


def test_fidelity_report_has_every_setting_and_attribute():
    from edsam_online.diffusion import SamplerConfig
    from edsam_online.diffusion.fidelity import measure_fidelity
    from edsam_online.diffusion.registry import load_sampler_ldm

    cfg = SamplerConfig(model="tiny-random", steps=1, inversion_steps=1, batch_size=4)
    scorer = AttributeScorer(FixedMeasurer(**{h: [names[0]] * 8 for h, names in HEADS.items()}))
    res = measure_fidelity(load_sampler_ldm(cfg), scorer, cfg, rhos=(0.0, 0.5), n=8)
    assert list(res) == ["vae", "identity", "rho=0", "rho=0.5", "pure"]
    for setting, row in res.items():
        assert set(row) == {"class", "colour", "size", "all", "off_style"} | ({"change"} if setting != "pure" else set())
        assert all(0.0 <= v <= 1.0 for v in row.values()) and row["all"] <= min(row["class"], row["colour"])


def test_the_frontier_plot_is_drawn_from_every_settings_rho_points(tmp_path):
    from _scripts import load_script

    ldm_fidelity = load_script("scripts/ldm_fidelity.py")
    row = {"class": 0.9, "colour": 1.0, "size": 1.0, "all": 0.9, "off_style": 0.3, "change": 0.1}
    results = {ldm_fidelity.setting_label(5, 3.0, "trailing"): {"vae": row, "rho=0": row, "rho=1": row, "pure": row}}
    ldm_fidelity.plot_frontier(results, str(tmp_path / "frontier.png"))
    assert Image.open(tmp_path / "frontier.png").size[0] > 100
