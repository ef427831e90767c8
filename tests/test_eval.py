"""Zero-shot and linear-probe evaluation under domain shift.

Most tests use a constructed CLIP whose image tower knows the true class of every
evaluation image (looked up by pixel hash) and whose text tower knows the class a
prompt names: a correct evaluation must then score 100%, and any mix-up of labels,
class order, domains or normalization shows up. Random towers must score near chance.
"""

import hashlib
import re

import numpy as np
import pytest
import torch
from torch import nn

from edsam_online.data import CLASSES, DOMAINS, SOURCE_DOMAIN, TARGET_DOMAINS, render_sample
from edsam_online.eval import (EvalConfig, domain_samples, evaluate, fit_linear_probe, format_eval_table,
                               linear_probe_eval, zero_shot_eval)

from _scripts import load_script

DIM = 32


def preprocess(pil):
    """Exact pixels as a uint8 CHW tensor, so the constructed model can recognise them."""
    return torch.from_numpy(np.array(pil)).permute(2, 0, 1)


def _digest(chw: torch.Tensor) -> bytes:
    return hashlib.sha1(chw.contiguous().numpy().tobytes()).digest()


def _seeded_noise(digest: bytes, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % 2**63)
    return torch.randn(n, generator=g)


class ConstructedClip(nn.Module):
    """image mode: "oracle" (one-hot of the true class), "noisy" (class mean + noise),
    "random" (noise only). `blind` domains get noise only. Text: one-hot of the named class,
    or noise when text_random."""

    def __init__(self, cfg, image_mode="oracle", blind=(), text_random=False, folders=()):
        super().__init__()
        self.image_mode, self.text_random = image_mode, text_random
        self.table = {}
        for domain in cfg.domains:
            for s in domain_samples(domain, cfg):
                self.table[_digest(preprocess_np(s.image))] = (s.meta["label"], domain in blind)
        for s in domain_samples(SOURCE_DOMAIN, cfg, "probe_train"):
            self.table[_digest(preprocess_np(s.image))] = (s.meta["label"], SOURCE_DOMAIN in blind)
        for domain, seed, n in folders:
            for i in range(n):
                s = render_sample(i, domain, cfg.resolution, seed)
                self.table[_digest(preprocess_np(s.image))] = (s.meta["label"], False)
        self.dummy = nn.Parameter(torch.zeros(1))

    def encode_image(self, images, normalize=False):
        out = []
        for img in images:
            d = _digest(img)
            label, blind = self.table[d]
            noise = _seeded_noise(d, DIM)
            if blind or self.image_mode == "random":
                out.append(noise)
            elif self.image_mode == "noisy":
                out.append(4.0 * nn.functional.one_hot(torch.tensor(label), DIM).float() + noise)
            else:
                out.append(nn.functional.one_hot(torch.tensor(label), DIM).float())
        return torch.stack(out)

    def encode_text(self, tokens, normalize=False):
        if self.text_random:
            feats = torch.stack([_seeded_noise(bytes([int(t)] * 8), DIM) for t in tokens[:, 0]])
        else:
            feats = nn.functional.one_hot(tokens[:, 0], DIM).float()
        return nn.functional.normalize(feats, dim=-1) if normalize else feats


def preprocess_np(image):
    return torch.from_numpy(image).permute(2, 0, 1)


def tokenizer(texts):
    """Token = index of the built-in class a prompt names (the constructed text tower's input)."""
    ids = []
    for text in texts:
        named = [c for c in CLASSES if re.search(rf"\b{c}\b", text)]
        assert len(named) == 1, text
        ids.append([CLASSES.index(named[0])])
    return torch.tensor(ids)


@pytest.fixture(scope="module")
def cfg():
    return EvalConfig(samples_per_class=6, probe_train_per_class=10, resolution=16)


def test_a_model_that_separates_classes_scores_perfectly_everywhere(cfg):
    model = ConstructedClip(cfg)
    model.train()
    metrics = evaluate(model, tokenizer, preprocess, cfg)
    for domain in DOMAINS:
        assert metrics[f"eval/zeroshot_top1/{domain}"] == 1.0
        assert metrics[f"eval/linear_probe/{domain}"] == 1.0
    for prefix in ("eval/zeroshot_top1", "eval/linear_probe"):
        assert metrics[f"{prefix}/source"] == 1.0 and metrics[f"{prefix}/target_mean"] == 1.0
    assert model.training  # evaluation restores the trainer's mode


def test_accuracy_is_attributed_to_the_right_domain(cfg):
    model = ConstructedClip(cfg, blind=("sketch",))
    metrics = zero_shot_eval(model, tokenizer, preprocess, cfg)
    assert metrics["eval/zeroshot_top1/sketch"] <= 0.35
    assert all(metrics[f"eval/zeroshot_top1/{d}"] == 1.0 for d in DOMAINS if d != "sketch")
    expected_mean = np.mean([metrics[f"eval/zeroshot_top1/{d}"] for d in TARGET_DOMAINS])
    assert metrics["eval/zeroshot_top1/target_mean"] == pytest.approx(expected_mean)
    assert metrics["eval/zeroshot_top1/source"] == metrics["eval/zeroshot_top1/flat"]
    # sketch is generator-unseen: only that group's mean falls
    unseen = np.mean([metrics[f"eval/zeroshot_top1/{d}"] for d in cfg.target_groups["generator_unseen"]])
    assert metrics["eval/zeroshot_top1/generator_unseen_mean"] == pytest.approx(unseen) and unseen < 1.0
    assert metrics["eval/zeroshot_top1/generator_seen_mean"] == 1.0


@pytest.mark.parametrize("image_mode,text_random", [("random", False), ("oracle", True)])
def test_random_towers_score_near_chance(image_mode, text_random):
    cfg = EvalConfig(domains=["flat", "dark"], samples_per_class=20, resolution=16, linear_probe=False)
    model = ConstructedClip(cfg, image_mode=image_mode, text_random=text_random)
    metrics = zero_shot_eval(model, tokenizer, preprocess, cfg)
    for d in cfg.domains:
        assert metrics[f"eval/zeroshot_top1/{d}"] <= 0.3, metrics


def test_linear_probe_learns_class_features_and_not_noise():
    cfg = EvalConfig(domains=["flat", "noisy"], samples_per_class=10, probe_train_per_class=20, resolution=16)
    good = linear_probe_eval(ConstructedClip(cfg, image_mode="noisy"), preprocess, cfg)
    assert all(good[f"eval/linear_probe/{d}"] >= 0.85 for d in cfg.domains), good
    chance = linear_probe_eval(ConstructedClip(cfg, image_mode="random"), preprocess, cfg)
    assert all(chance[f"eval/linear_probe/{d}"] <= 0.3 for d in cfg.domains), chance  # held out: no memorising


def test_fit_linear_probe_separates_gaussian_blobs():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 8, generator=g) * 3
    labels = torch.arange(200) % 4
    x = centers[labels] + torch.randn(200, 8, generator=g)
    probe = fit_linear_probe(x[:100], labels[:100], 4)
    assert (probe(x[100:]).argmax(1) == labels[100:]).float().mean() > 0.95


def _load_make_shards():
    return load_script("scripts/make_shards.py")


def test_imagefolder_trees_are_evaluated_by_their_folder_names(tmp_path):
    make_shards = _load_make_shards()
    make_shards.write_imagefolder(tmp_path / "mine", "sketch", 30, 16, seed=7)
    cfg = EvalConfig(domains=["flat"], samples_per_class=4, probe_train_per_class=8, resolution=16,
                     imagefolders={"my_sketches": str(tmp_path / "mine")})
    model = ConstructedClip(cfg, folders=[("sketch", 7, 30)])
    metrics = evaluate(model, tokenizer, preprocess, cfg)
    assert metrics["eval/zeroshot_top1/my_sketches"] == 1.0
    assert metrics["eval/linear_probe/my_sketches"] == 1.0
    assert "eval/zeroshot_top1/target_mean" not in metrics  # ImageFolder trees are not built-in targets
    assert "| my_sketches | 100.0 | 100.0 |" in format_eval_table(metrics)


def test_tiny_open_clip_model_runs_end_to_end():
    from edsam_online.models import ClipModelConfig, create_clip

    torch.manual_seed(0)
    model, _, preprocess_val, clip_tokenizer = create_clip(ClipModelConfig(name="edsam-tiny"))
    cfg = EvalConfig(domains=["flat", "sketch", "dark"], samples_per_class=3, probe_train_per_class=5,
                     probe_steps=20)
    metrics = evaluate(model, clip_tokenizer, preprocess_val, cfg)
    expected = {f"{p}/{d}" for p in ("eval/zeroshot_top1", "eval/linear_probe")
                for d in ("flat", "sketch", "dark", "source", "target_mean")}
    assert set(metrics) == expected
    assert all(0.0 <= v <= 1.0 for v in metrics.values())


def test_format_eval_table():
    metrics = {"eval/zeroshot_top1/sketch": 0.25, "eval/zeroshot_top1/flat": 0.9,
               "eval/zeroshot_top1/source": 0.9, "eval/zeroshot_top1/target_mean": 0.25,
               "eval/linear_probe/flat": 0.975, "eval/linear_probe/sketch": 0.5,
               "eval/linear_probe/source": 0.975, "eval/linear_probe/target_mean": 0.5,
               "train/loss": 1.0}
    assert format_eval_table(metrics) == "\n".join([
        "| domain | zero-shot top-1 (%) | linear probe top-1 (%) |",
        "|---|---:|---:|",
        "| flat (source) | 90.0 | 97.5 |",
        "| sketch | 25.0 | 50.0 |",
        "| target mean | 25.0 | 50.0 |",
    ])
    grouped = format_eval_table({**metrics, "eval/zeroshot_top1/generator_seen_mean": 0.4,
                                 "eval/linear_probe/generator_seen_mean": 0.6})
    assert grouped.splitlines()[-1] == "| generator-seen mean | 40.0 | 60.0 |"  # after the target mean
    only_zs = format_eval_table({"eval/zeroshot_top1/dark": 0.5})
    assert only_zs.splitlines()[0] == "| domain | zero-shot top-1 (%) |" and "| dark | 50.0 |" in only_zs


@pytest.mark.parametrize("kwargs,field", [
    (dict(domains=["flat", "oil"]), "domains"),
    (dict(samples_per_class=0), "samples_per_class"),
    (dict(batch_size=0), "batch_size"),
    (dict(resolution=4), "resolution"),
    (dict(templates="fancy"), "templates"),
    (dict(imagefolders={"flat": "/x"}), "imagefolders"),
    (dict(probe_weight_decays=[]), "probe_weight_decays"),
    (dict(target_groups={"mine": ["flat"]}), "target_groups.mine"),
    (dict(target_groups={"mine": []}), "target_groups.mine"),
    (dict(imagefolders={"generator_seen_mean": "/x"}), "imagefolders"),
])
def test_eval_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        EvalConfig(**kwargs)
