"""edsam-eval: a checkpoint or an open_clip model on built-in domains and ImageFolder trees."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

from edsam_online.eval import EvalConfig, EvalSet, zero_shot_eval

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
SMALL_EVAL = ["eval.domains=[flat]", "eval.samples_per_class=2", "eval.linear_probe=false"]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env={**ENV, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)


def _image_tree(root: Path) -> Path:
    """An ImageFolder tree drawn here with PIL, with class names no built-in data uses."""
    for name, colour in (("red_apple", (200, 30, 30)), ("green_pear", (40, 180, 60)), ("blue_plum", (40, 60, 200))):
        (root / name).mkdir(parents=True)
        for i in range(3):
            image = Image.new("RGB", (48, 40), (235, 235, 235))
            ImageDraw.Draw(image).ellipse((6 + i, 5, 40 - i, 35), fill=colour)
            image.save(root / name / f"{i}.png")
    return root


def test_edsam_eval_scores_a_trained_run_on_an_image_folder_it_did_not_write(tmp_path):
    run = tmp_path / "run"
    train = _run(["consumers.train", f"run_dir={run}", "method=none", "trainer.steps=2", "trainer.batch_size=4",
                  "trainer.progress=false", "logging.wandb=false", "runtime.num_workers=1", "data.length=64",
                  *SMALL_EVAL], ROOT)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    tree = _image_tree(tmp_path / "fruit")
    out = _run(["consumers.evaluate", f"checkpoint={run}", f"+eval.imagefolders.fruit={tree}", *SMALL_EVAL],
               tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "step_00000002.pt" in out.stdout and "| fruit | 9 | " in out.stdout and "| – |" in out.stdout
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert 0 <= metrics["eval/zeroshot_top1/fruit"] <= 1 and "eval/zeroshot_top5/fruit" not in metrics  # 3 classes
    assert metrics["eval/count/fruit"] == 9 and metrics["eval/count/flat"] == 20
    rows = list(csv.DictReader(open(run / "eval" / "metrics.csv")))
    assert {"metric": "eval/zeroshot_top1", "set": "fruit", "value": str(metrics["eval/zeroshot_top1/fruit"])} in rows
    per_class = [r for r in csv.DictReader(open(run / "eval" / "per_class.csv")) if r["set"] == "fruit"]
    assert [(r["class"], r["images"], r["linear_probe_top1"]) for r in per_class] == [
        ("blue plum", "3", ""), ("green pear", "3", ""), ("red apple", "3", "")]  # no probe: eval.linear_probe=false
    confusion = list(csv.reader(open(run / "eval" / "confusion_fruit.csv")))
    assert confusion[0] == ["true \\ predicted", "blue plum", "green pear", "red apple"]
    assert [sum(map(int, row[1:])) for row in confusion[1:]] == [3, 3, 3]


def test_edsam_eval_scores_an_open_clip_model_by_name(tmp_path):
    out = _run(["consumers.evaluate", "model=tiny_rn", "eval.resolution=32", "eval.templates=simple",
                f"out_dir={tmp_path / 'out'}", "eval.samples_per_class=1", "eval.domains=[flat,sketch]",
                "eval.linear_probe=false"], tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "edsam-tiny-rn (random weights)" in out.stdout
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(metrics) >= {"eval/zeroshot_top1/flat", "eval/zeroshot_top1/target_mean", "eval/zeroshot_top5/sketch"}


def test_edsam_eval_names_a_missing_checkpoint_or_eval_path(tmp_path):
    out = _run(["consumers.evaluate", f"checkpoint={tmp_path / 'nothing'}"], tmp_path)
    assert out.returncode == 2 and "config error: checkpoint: no run folder or checkpoint file" in out.stderr
    out = _run(["consumers.evaluate", f"+eval.retrieval.coco={tmp_path / 'coco.csv'}"], tmp_path)
    assert out.returncode == 2
    assert f"config error: eval.retrieval.coco: no such file: {tmp_path / 'coco.csv'}" in out.stderr


@pytest.mark.parametrize("group,name", [("vit_b16", "ViT-B-16"), ("tiny", "edsam-tiny"), ("rn50", "RN50"),
                                        ("tiny_rn", "edsam-tiny-rn")])
def test_every_model_group_option_composes_into_an_evaluate_config(group, name):
    from hydra import compose, initialize_config_dir

    from consumers.evaluation import CONFIG_DIR, EvaluateConfig
    from edsam_online.cli import help_text

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = OmegaConf.to_object(compose("evaluate", overrides=[f"model={group}", "eval.domains=[dark]"]))
    assert isinstance(cfg, EvaluateConfig) and cfg.model.name == name and cfg.eval.domains == ["dark"]
    text = help_text("edsam-eval", "", root=("consumers.evaluation", "EvaluateConfig"), groups=("model",))
    assert f"  model       {', '.join(sorted(p.stem for p in (ROOT / 'configs' / 'model').glob('*.yaml')))}" in text
    assert not any(f"\n  {g} " in text for g in ("data", "diffusion", "method", "runtime", "experiment"))
    assert "  eval.retrieval_max_images: int = " in text and "  model.name: str = " in text


def test_per_class_and_confusion_files(tmp_path):
    from consumers.evaluation import write_results
    from edsam_online.eval import EvalResult, SetResult

    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    zs = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0])
    result = EvalResult({"eval/zeroshot_top1/zoo": 5 / 8, "eval/count/zoo": 8},
                        {"zoo": SetResult(["ant", "bee", "cat", "dog"], labels, zs,
                                          torch.tensor([1, 1, 1, 0, 1, 1, 0, 0], dtype=torch.bool))},
                        "built-in source domain `flat` (500 images, 10 classes)", ["a note"])
    written = write_results(result, tmp_path, "edsam-tiny (random weights)")
    assert [p.name for p in written] == ["metrics.json", "metrics.csv", "per_class.csv", "confusion_zoo.csv",
                                         "info.json"]
    rows = [(r["class"], r["images"], r["zeroshot_top1"], r["linear_probe_top1"])
            for r in csv.DictReader(open(tmp_path / "per_class.csv"))]
    third = str(1 / 3)
    assert rows == [("ant", "3", str(2 / 3), "1.0"), ("bee", "2", "0.5", "0.5"), ("cat", "3", str(2 / 3), third),
                    ("dog", "0", "", "")]
    assert list(csv.reader(open(tmp_path / "confusion_zoo.csv"))) == [
        ["true \\ predicted", "ant", "bee", "cat", "dog"], ["ant", "2", "1", "0", "0"], ["bee", "0", "1", "1", "0"],
        ["cat", "1", "0", "2", "0"], ["dog", "0", "0", "0", "0"]]
    info = json.loads((tmp_path / "info.json").read_text())
    assert info == {"model": "edsam-tiny (random weights)", "notes": ["a note"],
                    "linear_probe_fitted_on": "built-in source domain `flat` (500 images, 10 classes)"}


class _OneHotText:
    """A text tower whose embedding of a prompt is the one-hot vector of the class it names."""

    classes = ["ant", "bee", "cat", "dog", "eel", "fox"]

    def encode_text(self, tokens, normalize=False):
        return F.one_hot(tokens, len(self.classes)).float()

    def tokenize(self, texts):
        return torch.tensor([next(i for i, c in enumerate(self.classes) if c in t.rstrip(".").split())
                             for t in texts])


def test_zero_shot_top1_and_top5_are_exact_on_a_constructed_case(tmp_path):
    """With one-hot class embeddings the classifier is the identity: an image's logits are its
    features, so the answer is known: top-1 hits images 0-2, top-5 misses only image 3."""
    text = _OneHotText()
    model = torch.nn.Module()
    model.encode_text = text.encode_text
    scores = torch.tensor([[6, 5, 4, 3, 2, 1], [1, 6, 5, 4, 3, 2], [2, 1, 6, 5, 4, 3],
                           [3, 2, 1, 6, 5, 4], [4, 3, 2, 1, 6, 5], [5, 4, 3, 2, 1, 6]], dtype=torch.float)
    labels = torch.tensor([0, 1, 2, 2, 5, 0])  # 3: its lowest class; 4, 5: their second best
    sets = {"zoo": EvalSet(F.normalize(scores, dim=1), labels, text.classes)}
    cfg = EvalConfig(domains=[], imagefolders={"zoo": str(tmp_path)}, templates="simple", top5=True)
    metrics = zero_shot_eval(model, text.tokenize, None, cfg, sets=sets)
    assert metrics["eval/zeroshot_top1/zoo"] == pytest.approx(3 / 6)
    assert metrics["eval/zeroshot_top5/zoo"] == pytest.approx(5 / 6)


def test_templates_can_come_from_a_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a drawing of a {}\n\nthe {} itself\n")
    assert EvalConfig(templates=str(path)).template_list() == ("a drawing of a {}", "the {} itself")
    path.write_text("no placeholder\n")
    with pytest.raises(ValueError, match="templates: every line"):
        EvalConfig(templates=str(path))


def test_the_linear_probe_learns_a_class_list_of_its_own(tmp_path):
    """A probe fit on an ImageFolder tree of non-built-in classes scores a held-out tree of
    them (colours an untrained image tower still separates) and skips sets it cannot."""
    from edsam_online.eval import linear_probe_eval
    from edsam_online.models import ClipModelConfig, create_clip

    def tree(root: Path, shift: int) -> Path:
        for name, colour in (("red_apple", (210, 20, 20)), ("green_pear", (20, 190, 40)), ("blue_plum", (20, 40, 210))):
            (root / name).mkdir(parents=True)
            for i in range(10):
                Image.new("RGB", (32, 32), tuple(max(0, c - 3 * i - shift) for c in colour)).save(root / name / f"{i}.png")
        return root

    torch.manual_seed(0)
    model, _, preprocess, _ = create_clip(ClipModelConfig(name="edsam-tiny"))
    cfg = EvalConfig(domains=["flat"], samples_per_class=1, imagefolders={"fruit": str(tree(tmp_path / "test", 1))},
                     probe_train=str(tree(tmp_path / "train", 0)))
    metrics = linear_probe_eval(model, preprocess, cfg)
    assert metrics["eval/linear_probe/fruit"] == 1.0
    assert "eval/linear_probe/flat" not in metrics  # its classes are not the probe's


def _write_shards(path: Path, colours: list[tuple[int, int, int]], per_class: int, corrupt: int = 0) -> str:
    """A labelled webdataset (img2dataset layout, ``.jpg`` + ``.cls``), with ``corrupt``
    samples whose JPEG bytes are garbage."""
    import io

    import webdataset as wds

    with wds.TarWriter(str(path)) as sink:
        for label, colour in enumerate(colours):
            for i in range(per_class):
                buf = io.BytesIO()
                Image.new("RGB", (32, 32), tuple(max(0, c - 3 * i) for c in colour)).save(buf, "JPEG", quality=95)
                sink.write({"__key__": f"{label:02d}{i:04d}", "jpg": buf.getvalue(), "cls": str(label).encode()})
        for i in range(corrupt):
            sink.write({"__key__": f"bad{i:04d}", "jpg": b"not a jpeg", "cls": b"0"})
    return str(path)


def test_webdataset_shards_with_a_label_key_and_a_class_names_file(tmp_path, caplog):
    """A webdataset test set and a webdataset probe train split, class names from files; a
    corrupt JPEG is skipped and counted, not fatal; a set without a names file stops at start."""
    from edsam_online.eval import evaluate
    from edsam_online.models import ClipModelConfig, create_clip

    colours = [(210, 20, 20), (20, 190, 40), (20, 40, 210)]
    names = tmp_path / "names.txt"
    names.write_text("red apple\ngreen pear\nblue plum\n")
    test = _write_shards(tmp_path / "test.tar", colours, 4, corrupt=2)
    train = _write_shards(tmp_path / "train.tar", colours, 10)
    torch.manual_seed(0)
    model, _, preprocess, tokenizer = create_clip(ClipModelConfig(name="edsam-tiny"))
    cfg = EvalConfig(domains=[], webdatasets={"fruit": test}, probe_train=train,
                     classnames={"fruit": str(names), "probe_train": str(names)})
    with caplog.at_level("WARNING", logger="edsam_online.eval"):
        metrics = evaluate(model, tokenizer, preprocess, cfg)
    assert f"webdataset {test}: 2 samples skipped" in caplog.text
    assert metrics["eval/linear_probe/fruit"] == 1.0
    assert 0 <= metrics["eval/zeroshot_top1/fruit"] <= 1
    with pytest.raises(ValueError, match=r"classnames: webdataset sets \['fruit'\] need a class-names file"):
        EvalConfig(domains=[], webdatasets={"fruit": test})


def test_imagefolder_class_names_from_imagenet_wnids_or_a_file(tmp_path):
    from edsam_online.eval import class_names

    assert class_names(["n01440764", "n01443537"]) == ["tench", "goldfish"]  # ImageNet indices 0 and 1
    assert class_names(["n01443537", "n99999999"]) == ["n01443537", "n99999999"]  # not all ImageNet wnids
    assert class_names(["red_apple", "blue_plum"]) == ["red apple", "blue plum"]
    names = tmp_path / "names.txt"
    names.write_text("pomme\nprune\n")
    assert class_names(["a", "b"], str(names)) == ["pomme", "prune"]
    with pytest.raises(ValueError, match="names 2 classes, the tree has 3"):
        class_names(["a", "b", "c"], str(names))
