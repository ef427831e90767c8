"""The generator's world corpus: the source's content in wider styles, captions with and without a style."""

import re

import numpy as np
import pytest

from edsam_online.data import RealDataConfig, iter_real_samples
from edsam_online.data.domains import (STYLE_FREE_TEMPLATES, TARGET_DOMAINS, WORLD, WORLD_STYLES, WORLD_TEMPLATES,
                                       get_domain)
from edsam_online.data.shapes import render_sample, sample_attributes, world_style
from edsam_online.diffusion.fidelity import caption_attributes
from edsam_online.eval import DEFAULT_TARGET_GROUPS

from _styles import light_plain_border


def _templates(caption: str, meta: dict) -> str:
    """The template a caption was written from."""
    for key, slot in (("size", "{size}"), ("color", "{color}"), ("class", "{cls}")):
        caption = re.sub(rf"\b{meta[key]}\b", slot, caption)
    return caption


def test_the_world_holds_every_style_evenly_with_the_sources_content():
    samples = [render_sample(i, WORLD, 32, seed=0) for i in range(700)]
    styles = [s.meta["style"] for s in samples]
    assert {st: styles.count(st) for st in WORLD_STYLES} == {st: 100 for st in WORLD_STYLES}
    assert [world_style(i, 0) for i in range(700)] == styles
    for i, s in enumerate(samples[:50]):
        attrs = sample_attributes(i, 0)  # the same content as the source's sample i, in another style
        assert (s.meta["class"], s.meta["size"]) == (attrs["class"], attrs["size"])
        assert caption_attributes(s.caption) == {"class": s.meta["class"], "colour": s.meta["color"],
                                                 "size": s.meta["size"]}
        twin = render_sample(i, s.meta["style"], 32, seed=0)
        np.testing.assert_array_equal(twin.image, s.image)  # a world sample is its style's render


def test_half_of_the_world_captions_name_no_style_and_the_rest_their_own():
    samples = [render_sample(i, WORLD, 32, seed=1) for i in range(1400)]
    free = [_templates(s.caption, s.meta) in STYLE_FREE_TEMPLATES for s in samples]
    assert 0.45 < np.mean(free) < 0.55
    for s, is_free in zip(samples, free):
        if not is_free:
            assert _templates(s.caption, s.meta) in WORLD_TEMPLATES[s.meta["style"]], s.caption
    # A caption that names a light or plain background belongs to flat images only, so the
    # generator keeps a source caption that asks for one to the source style.
    light = [s.meta["style"] for s in samples if "light background" in s.caption or "plain background" in s.caption]
    assert light and set(light) == {"flat"}
    assert all(WORLD_TEMPLATES[st] for st in WORLD_STYLES)


def test_only_the_source_style_has_a_light_plain_background():
    for st in WORLD_STYLES:
        share = light_plain_border(np.stack([render_sample(i, st, 32, seed=2).image for i in range(60)])).mean()
        assert share == 1.0 if st == "flat" else share <= 0.1, (st, share)


def test_target_groups_split_the_targets_by_the_world():
    seen, unseen = DEFAULT_TARGET_GROUPS["generator_seen"], DEFAULT_TARGET_GROUPS["generator_unseen"]
    assert sorted(seen + unseen) == sorted(TARGET_DOMAINS) and len(seen) >= 3 and len(unseen) >= 3
    assert set(seen) <= set(WORLD_STYLES) and not set(unseen) & set(WORLD_STYLES)


def test_the_world_is_a_builtin_data_domain_and_a_bad_domain_is_refused():
    cfg = RealDataConfig(domain=WORLD, length=14, shuffle=False, epochs=1)
    samples = list(iter_real_samples(cfg))
    assert [s.meta["style"] for s in samples] == [world_style(i, 0) for i in range(14)]
    with pytest.raises(ValueError, match="domain"):
        RealDataConfig(domain="mars")


def test_an_image_folder_with_captions_is_read_and_an_uncaptioned_image_is_counted(tmp_path):
    from PIL import Image

    from edsam_online.data import DataCounters

    for i in range(3):
        s = render_sample(i, "flat", 32, seed=0)
        Image.fromarray(s.image).save(tmp_path / f"{i}.png")
        if i != 1:
            (tmp_path / f"{i}.txt").write_text(s.caption + "\n")
    counters = DataCounters()
    cfg = RealDataConfig(kind="imagefolder", path=str(tmp_path), shuffle=False, epochs=1)
    samples = list(iter_real_samples(cfg, counters=counters))
    assert [s.key for s in samples] == ["0.png", "2.png"]
    assert samples[0].caption == render_sample(0, "flat", 32, seed=0).caption
    assert counters["data/missing_fields"] == 1
    with pytest.raises(ValueError, match="path"):
        RealDataConfig(kind="imagefolder")
