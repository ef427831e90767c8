"""Built-in shapes data: determinism, classes, captions, sizes and domain shift."""

import re

import numpy as np
import pytest

from edsam_online.data import CLASSES, DOMAINS, SOURCE_DOMAIN, TARGET_DOMAINS, render_sample
from edsam_online.data.domains import BASE_PALETTE, UNSEEN_PALETTE
from edsam_online.data.shapes import SIZES

ALL_COLORS = set(BASE_PALETTE) | set(UNSEEN_PALETTE)


def test_exactly_the_ten_classes():
    assert CLASSES == ("circle", "square", "triangle", "star", "heart",
                       "cross", "hexagon", "ring", "arrow", "crescent")
    assert SOURCE_DOMAIN == "flat" and DOMAINS[0] == "flat"
    assert len(TARGET_DOMAINS) >= 4 and SOURCE_DOMAIN not in TARGET_DOMAINS
    assert len(BASE_PALETTE) >= 8


@pytest.mark.parametrize("domain", DOMAINS)
def test_render_is_deterministic_by_seed_domain_index(domain):
    a, b = render_sample(7, domain, 32, seed=3), render_sample(7, domain, 32, seed=3)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption and a.meta == b.meta
    assert a.image.dtype == np.uint8 and a.image.shape == (32, 32, 3)
    assert not np.array_equal(a.image, render_sample(7, domain, 32, seed=4).image)
    assert not np.array_equal(a.image, render_sample(8, domain, 32, seed=3).image)


def test_meta_and_label_agree_and_classes_are_balanced():
    samples = [render_sample(i, "flat", 32, seed=1) for i in range(40)]
    for s in samples:
        assert CLASSES[s.meta["label"]] == s.meta["class"]
        assert {"class", "label", "color", "size", "domain", "seed", "index"} <= set(s.meta)
    for block in range(4):  # every 10 consecutive indices hold each class once
        labels = sorted(s.meta["label"] for s in samples[10 * block:10 * block + 10])
        assert labels == list(range(10))


def _words(caption):
    return set(re.findall(r"[a-z]+", caption.lower()))


@pytest.mark.parametrize("domain", DOMAINS)
def test_caption_states_the_true_class_color_and_size(domain):
    templates = set()
    for i in range(60):
        s = render_sample(i, domain, 32, seed=0)
        words = _words(s.caption)
        assert words & set(CLASSES) == {s.meta["class"]}, s.caption
        assert words & ALL_COLORS == {s.meta["color"]}, s.caption
        assert words & set(SIZES) == {s.meta["size"]}, s.caption
        templates.add(re.sub(r"\b(%s)\b" % "|".join([*CLASSES, *ALL_COLORS, *SIZES]), "_", s.caption))
    assert len(templates) >= 3  # several phrasings


def _foreground(s):
    """Pixels that differ clearly from the (uniform) background at the corner."""
    img = s.image.astype(int)
    return np.abs(img - img[0, 0]).sum(-1) > 60


def test_sizes_cover_the_documented_fraction_of_the_image():
    extents = {size: [] for size in SIZES}
    for i in range(150):
        s = render_sample(i, "flat", 64, seed=0)
        ys, xs = np.nonzero(_foreground(s))
        extents[s.meta["size"]].append(max(np.ptp(xs), np.ptp(ys)) / 64)
    med = {k: float(np.median(v)) for k, v in extents.items()}
    assert 0.28 <= med["small"] <= 0.46, med
    assert med["small"] < med["medium"] < med["large"]
    assert 0.58 <= med["large"] <= 0.86, med


def test_targets_keep_content_but_change_appearance():
    for domain in TARGET_DOMAINS:
        diffs = []
        for i in range(10):
            src, tgt = render_sample(i, SOURCE_DOMAIN, 32, 0), render_sample(i, domain, 32, 0)
            assert (tgt.meta["class"], tgt.meta["size"]) == (src.meta["class"], src.meta["size"])
            diffs.append(np.abs(src.image.astype(int) - tgt.image.astype(int)).mean())
        assert np.mean(diffs) > 8, (domain, np.mean(diffs))
    pal = [render_sample(i, "palette", 32, 0).meta["color"] for i in range(30)]
    assert set(pal) <= set(UNSEEN_PALETTE) and not set(pal) & set(BASE_PALETTE)


def test_content_does_not_depend_on_resolution():
    for res in (32, 64, 256):
        s = render_sample(5, "sketch", res, seed=2)
        assert s.image.shape == (res, res, 3)
        assert s.caption == render_sample(5, "sketch", 32, seed=2).caption


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="domain"):
        render_sample(0, "watercolor", 32, 0)
    with pytest.raises(ValueError, match="resolution"):
        render_sample(0, "flat", 4, 0)
    with pytest.raises(ValueError, match="index"):
        render_sample(-1, "flat", 32, 0)
    with pytest.raises(ValueError, match="seed"):
        render_sample(0, "flat", 32, -2)
