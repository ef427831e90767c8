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
from edsam_online.eval import (EvalConfig, check_eval_paths, domain_samples, evaluate, evaluate_detailed,
                               fit_linear_probe, format_eval_table, linear_probe_eval, retrieval_eval,
                               retrieval_recall, zero_shot_eval)

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
    """Token = index of the built-in class a prompt names, any case (the constructed text
    tower's input); DIM - 1 for a prompt naming none."""
    ids = []
    for text in texts:
        named = [c for c in CLASSES if re.search(rf"\b{c}\b", text, re.I)]
        assert len(named) <= 1, text
        ids.append([CLASSES.index(named[0]) if named else DIM - 1])
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
    assert metrics["eval/count/my_sketches"] == 30 and metrics["eval/count/flat"] == 40
    assert "| my_sketches | 30 | 100.0 | 100.0 |" in format_eval_table(metrics)


def test_tiny_open_clip_model_runs_end_to_end():
    from edsam_online.models import ClipModelConfig, create_clip

    torch.manual_seed(0)
    model, _, preprocess_val, clip_tokenizer = create_clip(ClipModelConfig(name="edsam-tiny"))
    cfg = EvalConfig(domains=["flat", "sketch", "dark"], samples_per_class=3, probe_train_per_class=5,
                     probe_steps=20)
    metrics = evaluate(model, clip_tokenizer, preprocess_val, cfg)
    expected = {f"{p}/{d}" for p in ("eval/zeroshot_top1", "eval/linear_probe")
                for d in ("flat", "sketch", "dark", "source", "target_mean")}
    counts = {"eval/count/flat": 30, "eval/count/sketch": 30, "eval/count/dark": 30, "eval/count/probe_train": 50}
    assert set(metrics) == expected | set(counts)
    assert all(0.0 <= metrics[k] <= 1.0 for k in expected) and {k: metrics[k] for k in counts} == counts


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
    (dict(imagefolders={"probe_train": "/x"}), "imagefolders"),
    (dict(imagefolders={"x": "/x"}, probe_train="x", classnames={"probe_train": "/n"}), "classnames.probe_train"),
    (dict(domains=[], imagefolders={"x": "/x"}, probe_train="x"), "domains: nothing to evaluate"),
    (dict(retrieval={"a/b": "/x.csv"}), "retrieval"),
    (dict(retrieval_max_images=0), "retrieval_max_images"),
])
def test_eval_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        EvalConfig(**kwargs)


def _names_file(path, names):
    path.write_text("".join(f"{n}\n" for n in names))
    return str(path)


def test_top5_is_reported_only_for_sets_of_more_than_five_classes(tmp_path):
    make_shards = _load_make_shards()
    make_shards.write_imagefolder(tmp_path / "three", "sketch", 3, 16, seed=7)  # circle, square, triangle
    cfg = EvalConfig(domains=["flat"], samples_per_class=2, resolution=16, top5=True, linear_probe=False,
                     imagefolders={"three": str(tmp_path / "three")})
    result = evaluate_detailed(ConstructedClip(cfg, folders=[("sketch", 7, 3)]), tokenizer, preprocess, cfg)
    assert result.metrics["eval/zeroshot_top5/flat"] == 1.0 and "eval/zeroshot_top5/three" not in result.metrics
    assert result.metrics["eval/count/three"] == 3
    table = result.table()
    assert "| three | 3 | 100.0 | – |" in table
    assert "note: zero-shot top-5 is reported for sets of more than 5 classes only, not for three (3)" in table


def test_probe_fit_on_a_named_split_scores_sets_whose_class_file_differs_in_case(tmp_path):
    """`probe_train` names a configured tree: the probe fits on it (which is then not evaluated),
    scores a set whose class-names file spells the classes capitalized, and a set with a class
    it does not know gets a note instead of a silent gap."""
    make_shards = _load_make_shards()
    make_shards.write_imagefolder(tmp_path / "train", "sketch", 40, 16, seed=7)
    make_shards.write_imagefolder(tmp_path / "test", "sketch", 20, 16, seed=8)
    folders = sorted(p.name for p in (tmp_path / "test").iterdir())
    odd = tmp_path / "odd"
    make_shards.write_imagefolder(odd, "sketch", 20, 16, seed=8)
    cfg = EvalConfig(domains=["flat"], samples_per_class=2, probe_train_per_class=2, resolution=16,
                     imagefolders={"train": str(tmp_path / "train"), "test": str(tmp_path / "test"), "odd": str(odd)},
                     classnames={"test": _names_file(tmp_path / "test.txt", [f.capitalize() for f in folders]),
                                 "odd": _names_file(tmp_path / "odd.txt", ["blob", *folders[1:]])},
                     probe_train="train")
    check_eval_paths(cfg)
    model = ConstructedClip(cfg, folders=[("sketch", 7, 40), ("sketch", 8, 20)])
    result = evaluate_detailed(model, tokenizer, preprocess, cfg)
    m = result.metrics
    assert m["eval/linear_probe/test"] == 1.0 and m["eval/linear_probe/flat"] == 1.0
    assert "eval/linear_probe/odd" not in m and "eval/zeroshot_top1/train" not in m
    assert m["eval/count/probe_train"] == 40 and m["eval/count/test"] == 20
    assert result.probe == "eval.imagefolders.train (40 images, 10 classes)"
    assert result.notes == [
        "linear probe: no number for odd: 1 of its 10 classes ('blob') are not among the probe's 10"]
    assert result.sets["odd"].probe_correct is None and bool(result.sets["test"].probe_correct.all())
    assert "linear probe fitted on: eval.imagefolders.train (40 images, 10 classes)" in result.table()
    assert "| odd | 20 | " in result.table() and result.table().count("| – |") == 1  # odd's probe cell


def test_confusion_matrix_rows_are_true_classes():
    cfg = EvalConfig(domains=["flat", "sketch"], samples_per_class=6, resolution=16, linear_probe=False)
    result = evaluate_detailed(ConstructedClip(cfg, blind=("sketch",)), tokenizer, preprocess, cfg)
    flat, sketch = result.sets["flat"].confusion(), result.sets["sketch"].confusion()
    assert torch.equal(flat, 6 * torch.eye(len(CLASSES), dtype=torch.long))
    assert flat.sum() == sketch.sum() == 60 and sketch.sum(1).tolist() == [6] * len(CLASSES)
    assert sketch.trace().item() == round(60 * result.metrics["eval/zeroshot_top1/sketch"])


def test_retrieval_recall_on_hand_made_embeddings():
    """Four images on a circle, text i a little past image i: image i's nearest texts are i,
    then i-1; text i's nearest images are i, then i+1."""
    n = 4
    angle = torch.arange(n) * (2 * torch.pi / n)
    images = torch.stack([angle.cos(), angle.sin()], 1)
    texts = torch.stack([(angle + 0.3).cos(), (angle + 0.3).sin()], 1)
    relevant = torch.eye(n, dtype=torch.bool)
    assert retrieval_recall(images, texts, relevant) == {"i2t_r1": 1.0, "t2i_r1": 1.0}  # k >= 4 candidates left out
    shifted = relevant.roll(-1, dims=1)  # image i matches text i-1: the second nearest both ways
    assert retrieval_recall(images, texts, shifted, ks=(1, 2)) == {"i2t_r1": 0.0, "i2t_r2": 1.0,
                                                                   "t2i_r1": 0.0, "t2i_r2": 1.0}
    shifted[3, 3] = True  # image 3 matches text 3 as well
    assert retrieval_recall(images, texts, shifted, ks=(1,)) == {"i2t_r1": 0.25, "t2i_r1": 0.25}


def _captioned_images(folder, n):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        paths.append(folder / f"{i:03d}.png")
        Image.new("RGB", (20, 20), (20 * i, 255 - 20 * i, 90)).save(paths[-1])
    return paths


def test_retrieval_on_a_captioned_webdataset_and_a_csv(tmp_path, caplog):
    import webdataset as wds

    from edsam_online.models import ClipModelConfig, create_clip

    paths = _captioned_images(tmp_path / "img", 12)
    with wds.TarWriter(str(tmp_path / "caps.tar")) as sink:
        for i, p in enumerate(paths):
            sink.write({"__key__": f"{i:04d}", "png": p.read_bytes(), "txt": f"picture number {i}".encode()})
        sink.write({"__key__": "nocap", "png": paths[0].read_bytes(), "txt": b"  "})
    rows = [f"img/{p.name},picture number {i}" for i, p in enumerate(paths)]
    rows.insert(1, "img/missing.png,gone")
    rows += ["img/000.png,a second caption of picture 0", "img/001.png,picture number 0"]
    (tmp_path / "caps.csv").write_text("path,caption\n" + "\n".join(rows) + "\n")
    cfg = EvalConfig(domains=["flat"], retrieval_max_images=11, batch_size=4,
                     retrieval={"shards": str(tmp_path / "caps.tar"), "table": str(tmp_path / "caps.csv")})
    check_eval_paths(cfg)
    torch.manual_seed(0)
    model, _, preprocess_val, clip_tokenizer = create_clip(ClipModelConfig(name="edsam-tiny"))
    with caplog.at_level("WARNING", logger="edsam_online.eval"):
        m = retrieval_eval(model, clip_tokenizer, preprocess_val, cfg)
    assert "retrieval table: skipped img/missing.png" in caplog.text
    assert m["eval/retrieval/images/shards"] == 11 and m["eval/retrieval/captions/shards"] == 11  # capped
    # the CSV's first 11 distinct paths (000, missing, 001-009) with all their captions, one unreadable;
    # "picture number 0" captions images 0 and 1
    assert m["eval/retrieval/images/table"] == 10 and m["eval/retrieval/captions/table"] == 11
    for name, left_out in (("shards", set()), ("table", {"t2i_r10"})):  # 10 images: R@10 would be 1
        recalls = {k.split("/")[2]: v for k, v in m.items() if k.endswith("/" + name) and "_r" in k}
        assert set(recalls) == {f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)} - left_out
        assert all(0 <= v <= 1 for v in recalls.values())
        assert recalls["i2t_r1"] <= recalls["i2t_r5"] <= recalls["i2t_r10"]
    table = format_eval_table(m)
    assert table.startswith("| retrieval | images | captions | image→text R@1 (%)") and "| table | 10 | 11 |" in table


@pytest.mark.parametrize("change,message", [
    (dict(imagefolders={"pacs": "{tmp}/nothing"}), "eval.imagefolders.pacs: no such file or folder: {tmp}/nothing"),
    (dict(imagefolders={"pacs": "{tmp}/names.txt"}), "eval.imagefolders.pacs: {tmp}/names.txt is not a folder"),
    (dict(imagefolders={"pacs": "{tmp}/empty"}), "eval.imagefolders.pacs: {tmp}/empty holds no class folders"),
    (dict(imagefolders={"pacs": "{tmp}/tree"}), "eval.imagefolders.pacs: class folder {tmp}/tree/b holds no images"),
    (dict(webdatasets={"w": "{tmp}/{{0000..0002}}.tar"}, classnames={"w": "{tmp}/names.txt"}),
     r"eval.webdatasets.w: .*shard\(s\) not found, e.g. {tmp}/0002.tar"),
    (dict(probe_train="{tmp}/gone.tar", classnames={"probe_train": "{tmp}/names.txt"}),
     "eval.probe_train: no such file or folder: {tmp}/gone.tar"),
    (dict(retrieval={"coco": "{tmp}/coco.csv"}), "eval.retrieval.coco: no such file: {tmp}/coco.csv"),
    (dict(retrieval={"bad": "{tmp}/names.txt.csv"}), r"eval.retrieval.bad: .* lacks column\(s\) \['caption', 'path'\]"),
    (dict(retrieval={"cc": "{tmp}/empty"}), "eval.retrieval.cc: no shards found"),
])
def test_check_eval_paths_names_the_key(tmp_path, change, message):
    (tmp_path / "names.txt").write_text("a\nb\n")
    (tmp_path / "names.txt.csv").write_text("image,text\n")
    (tmp_path / "empty").mkdir()
    for i in range(2):
        (tmp_path / f"{i:04d}.tar").write_bytes(b"")
    (tmp_path / "tree" / "a").mkdir(parents=True)
    (tmp_path / "tree" / "a" / "x.png").write_bytes(b"")  # named like an image: not opened
    (tmp_path / "tree" / "b").mkdir()
    (tmp_path / "tree" / "b" / "notes.txt").write_text("")
    change = {k: {n: p.format(tmp=tmp_path) for n, p in v.items()} if isinstance(v, dict) else v.format(tmp=tmp_path)
              for k, v in change.items()}
    cfg = EvalConfig(domains=["flat"], **change)
    with pytest.raises(ValueError, match="^" + message.format(tmp=re.escape(str(tmp_path)))):
        check_eval_paths(cfg)
    (tmp_path / "tree" / "b" / "y.JPG").write_bytes(b"")
    check_eval_paths(EvalConfig(imagefolders={"pacs": str(tmp_path / "tree")},
                                webdatasets={"w": str(tmp_path / "{0000..0001}.tar")},
                                classnames={"w": str(tmp_path / "names.txt")}))


def test_format_eval_table_with_counts_probe_and_notes():
    metrics = {"eval/zeroshot_top1/flat": 0.5, "eval/zeroshot_top5/flat": 0.75, "eval/zeroshot_top1/fruit": 1.0,
               "eval/linear_probe/flat": 0.25, "eval/count/flat": 40, "eval/count/fruit": 9,
               "eval/count/probe_train": 500}
    assert format_eval_table(metrics, "built-in source domain `flat` (500 images, 10 classes)", ["why"]) == "\n".join([
        "| domain | images | zero-shot top-1 (%) | zero-shot top-5 (%) | linear probe top-1 (%) |",
        "|---|---:|---:|---:|---:|",
        "| flat (source) | 40 | 50.0 | 75.0 | 25.0 |",
        "| fruit | 9 | 100.0 | – | – |",
        "linear probe fitted on: built-in source domain `flat` (500 images, 10 classes)",
        "note: why",
    ])
