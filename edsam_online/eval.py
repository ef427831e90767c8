"""Evaluation under domain shift: zero-shot and linear-probe accuracy per domain, and
image-text retrieval.

The ED-SAM question is how a CLIP trained on the source domain alone holds up on
shifted targets. For every built-in domain (and any ImageFolder tree or labelled
webdataset the user points at) this reports

* zero-shot top-1 (and top-5 for sets of more than 5 classes): open_clip's
  `build_zero_shot_classifier` over a template list (see `template_set`), cosine
  similarity to the image embedding, argmax;
* linear probe top-1: a logistic-regression head fit on frozen image features of
  *source* training images only (L2 strength picked on a held-out fifth of them), or of
  `EvalConfig.probe_train`, then applied to every set whose classes are among its own
  (class names compared ignoring case and '_'); a set left out gets a note saying why;

and, for captioned sets (`EvalConfig.retrieval`), recall@1/5/10 of image->text and
text->image retrieval.

Metric keys: `eval/zeroshot_top1/<set>`, `eval/zeroshot_top5/<set>`, `eval/linear_probe/<set>`,
plus `.../source` (the source domain), `.../target_mean` (mean over built-in targets) and
`.../<group>_mean` for each target group (`EvalConfig.target_groups`); `eval/count/<set>`
(images evaluated) and `eval/count/probe_train` (images the probe was fit on);
`eval/retrieval/{i2t,t2i}_r{1,5,10}/<name>` (recall@k, reported only when k is below the
number of candidates) with `eval/retrieval/images/<name>` and `eval/retrieval/captions/<name>`.
Evaluation images use their own seed (default 1000, training data defaults to 0)
and the probe trains on seed+1, so nothing evaluated was trained on.

`evaluate` returns the metrics (what the trainer logs); `evaluate_detailed` also returns
every set's predictions (per-class accuracy, confusion matrices: edsam-eval writes them),
what the probe was fit on and a note for every number a set lacks. `check_eval_paths`
checks every path a config names without reading an image.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from .data.domains import BASE_PALETTE, DOMAINS, SOURCE_DOMAIN, TARGET_DOMAINS, WORLD_STYLES
from .data.shapes import CLASSES, SIZES, render_sample
from .validation import require_at_least

logger = logging.getLogger(__name__)

ZS_PREFIX, ZS5_PREFIX, LP_PREFIX = "eval/zeroshot_top1", "eval/zeroshot_top5", "eval/linear_probe"
COUNT_PREFIX, RETRIEVAL_PREFIX = "eval/count", "eval/retrieval"
PROBE_TRAIN = "probe_train"
RECALL_KS = (1, 5, 10)
_SUMMARY = ("source", "target_mean")
#: The built-in targets split by whether the shipped generator's world corpus holds their style.
DEFAULT_TARGET_GROUPS = {
    "generator_seen": [d for d in TARGET_DOMAINS if d in WORLD_STYLES],
    "generator_unseen": [d for d in TARGET_DOMAINS if d not in WORLD_STYLES],
}


def group_mean_name(group: str) -> str:
    return f"{group}_mean"

# "shapes": the wording of the built-in captions ("a {size} {color} {class}"),
# ensembled over every size and training color so no single attribute biases a
# class embedding, plus two generic prompts. "simple"/"openai": open_clip's
# ImageNet prompt sets, for models trained on web captions (read from open_clip on first
# use, so that reading a config does not load it).
TEMPLATE_SET_NAMES = ("shapes", "simple", "openai")


def template_set(name: str) -> tuple[str, ...]:
    """The prompt templates of one of :data:`TEMPLATE_SET_NAMES`."""
    if name == "shapes":
        return tuple(f"a {size} {color} {{}}" for size in SIZES for color in BASE_PALETTE) + ("a photo of a {}", "a {}")
    import open_clip

    if name == "simple":
        return tuple(t if isinstance(t, str) else t("{}") for t in open_clip.SIMPLE_IMAGENET_TEMPLATES)
    if name == "openai":
        return tuple(t("{}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES)
    raise KeyError(name)


@dataclass
class EvalConfig:
    """What to evaluate.

    domains: built-in domains (source and targets). imagefolders: extra name -> root of
    a torchvision ImageFolder tree (one folder per class; from Hydra:
    `+eval.imagefolders.pacs_sketch=/data/pacs/sketch`). webdatasets: extra name -> the
    shards (a brace pattern, one shard or URL, or a folder of *.tar) of a webdataset whose
    samples hold an image (`wds_image_key`) and an integer label (`wds_label_key`).
    Class names (see `class_names`): a file in `classnames[name]` (one name per line,
    line i is label i; for ImageFolder, label i is the i-th folder in sorted order); else,
    for ImageFolder, the folder names, or open_clip's ImageNet class names when every
    folder is an ImageNet wnid (n01440764 …, also for subsets such as ImageNet-R); a
    webdataset needs the file.
    probe_train: what the linear probe is fit on instead of the built-in source domain:
    the name of an `imagefolders`/`webdatasets` entry (that set is then the probe's
    training split and is not evaluated itself), or else an ImageFolder tree or webdataset
    shards (a path that is not a folder; class names as for sets, `classnames.probe_train`
    for a file); the probe then scores every set whose classes are among its own.
    templates: one of TEMPLATE_SET_NAMES, or a text file with one template per line, each
    holding "{}" where the class name goes. top5: also report zero-shot top-5
    (`eval/zeroshot_top5/...`) for sets of more than 5 classes.
    probe_weight_decays: L2 strengths to choose from.
    retrieval: name -> a captioned set for image-text retrieval: a CSV file (`.csv`,
    columns path,caption, paths relative to its folder; rows sharing a path are one image
    with several captions) or webdataset shards (image + `.txt` caption, as `data.kind=
    webdataset` reads); the first `retrieval_max_images` images are used.
    every_steps: how often the trainer evaluates (0: only at the end).
    target_groups: name -> built-in target domains; each group's mean is reported as
      `<name>_mean` beside the target mean. The default splits the targets into those whose
      style the generator's world corpus contains (`generator_seen`) and those no training
      here sees (`generator_unseen`).
    """

    domains: list[str] = field(default_factory=lambda: list(DOMAINS))
    samples_per_class: int = 20
    resolution: int = 32
    batch_size: int = 128
    seed: int = 1000
    templates: str = "shapes"
    top5: bool = False
    linear_probe: bool = True
    probe_train_per_class: int = 50
    probe_steps: int = 100
    probe_weight_decays: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1])
    imagefolders: dict[str, str] = field(default_factory=dict)
    webdatasets: dict[str, str] = field(default_factory=dict)
    retrieval: dict[str, str] = field(default_factory=dict)
    retrieval_max_images: int = 1000
    wds_image_key: str = "jpg;jpeg;png;webp"
    wds_label_key: str = "cls"
    classnames: dict[str, str] = field(default_factory=dict)
    probe_train: str = ""
    every_steps: int = 0
    target_groups: dict[str, list[str]] = field(default_factory=lambda: {
        k: list(v) for k, v in DEFAULT_TARGET_GROUPS.items()})

    def __post_init__(self) -> None:
        self.domains = list(self.domains)
        self.target_groups = {str(k): list(v) for k, v in dict(self.target_groups).items()}
        for group, members in self.target_groups.items():
            bad = [d for d in members if d not in TARGET_DOMAINS]
            if bad or not members or "/" in group:
                raise ValueError(f"target_groups.{group}: must be a non-empty list of built-in targets "
                                 f"{list(TARGET_DOMAINS)} under a name without '/', got {members}")
        self.imagefolders = dict(self.imagefolders)
        self.webdatasets = dict(self.webdatasets)
        self.retrieval = dict(self.retrieval)
        self.classnames = dict(self.classnames)
        self.probe_weight_decays = [float(w) for w in self.probe_weight_decays]
        unknown = [d for d in self.domains if d not in DOMAINS]
        if unknown:
            raise ValueError(f"domains: unknown {unknown}, choose from {list(DOMAINS)}")
        if not self.domains and not self.extra_sets() and not self.retrieval:
            raise ValueError("domains: nothing to evaluate (no domains, imagefolders, webdatasets or retrieval "
                             "sets besides the probe's training split)")
        require_at_least(self, 1, "samples_per_class", "batch_size", "probe_train_per_class", "probe_steps",
                         "retrieval_max_images")
        require_at_least(self, 8, "resolution")
        require_at_least(self, 0, "seed")
        if self.templates not in TEMPLATE_SET_NAMES:
            self.template_list()  # a bad file fails here, naming the field
        if not self.probe_weight_decays or min(self.probe_weight_decays) < 0:
            raise ValueError(f"probe_weight_decays must be a non-empty list of values >= 0, "
                             f"got {self.probe_weight_decays}")
        require_at_least(self, 0, "every_steps")
        extra = [*self.imagefolders, *self.webdatasets]
        summary = (*_SUMMARY, *map(group_mean_name, self.target_groups))
        clash = [n for n in extra if n in DOMAINS or n in summary or n.endswith("_mean") or "/" in n
                 or n == PROBE_TRAIN or extra.count(n) > 1]
        if clash:
            raise ValueError(f"imagefolders/webdatasets: names {clash} clash with built-in domains, {summary}, "
                             f"{PROBE_TRAIN!r}, each other, or contain '/' or end in '_mean'")
        bad = [n for n in self.retrieval if "/" in n or not n]
        if bad:
            raise ValueError(f"retrieval: names {bad} must be non-empty and hold no '/'")
        key = self.probe_train_key()
        for name, path in self.classnames.items():
            if name not in extra and name != PROBE_TRAIN:
                raise ValueError(f"classnames.{name}: no imagefolders/webdatasets entry (or probe_train) of that name")
            if name == PROBE_TRAIN and key:
                raise ValueError(f"classnames.{PROBE_TRAIN}: probe_train names the set {key!r}, whose class names "
                                 f"are classnames.{key}")
            if not os.path.isfile(path):
                raise ValueError(f"classnames.{name}: no class-names file at {path!r}")
        needs_file = [n for n in self.webdatasets if n not in self.classnames]
        if self.probe_train and not key and not os.path.isdir(self.probe_train) and PROBE_TRAIN not in self.classnames:
            needs_file.append(PROBE_TRAIN)
        if needs_file:
            raise ValueError(f"classnames: webdataset sets {needs_file} need a class-names file "
                             f"(+eval.classnames.NAME=FILE, one class name per line, line i is label i)")

    def probe_train_key(self) -> str:
        """The `imagefolders`/`webdatasets` entry `probe_train` names ("" if it is a path or unset)."""
        return self.probe_train if self.probe_train in (*self.imagefolders, *self.webdatasets) else ""

    def extra_sets(self) -> dict[str, str]:
        """The ImageFolder trees and webdatasets evaluated: name -> path (not the probe's split)."""
        key = self.probe_train_key()
        return {n: p for n, p in {**self.imagefolders, **self.webdatasets}.items() if n != key}

    def template_list(self) -> tuple[str, ...]:
        """The prompt templates: a named set, or the lines of a file (blank lines skipped)."""
        if self.templates in TEMPLATE_SET_NAMES:
            return template_set(self.templates)
        if not os.path.isfile(self.templates):
            raise ValueError(f"templates must be one of {list(TEMPLATE_SET_NAMES)} or a file, got {self.templates!r}")
        with open(self.templates, encoding="utf-8") as f:
            lines = tuple(line.strip() for line in f if line.strip())
        if not lines or any("{}" not in t for t in lines):
            raise ValueError(f"templates: every line of {self.templates} must hold '{{}}' for the class name")
        return lines


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def _check_shards(key: str, pattern: str) -> None:
    if "{" not in pattern and not _is_remote(pattern) and not os.path.exists(pattern):
        raise ValueError(f"{key}: no such file or folder: {pattern}")
    from .data.sources import resolve_shards

    try:
        resolve_shards(pattern)
    except ValueError as err:
        raise ValueError(f"{key}: {str(err).removeprefix('path: ')} (webdataset shards: a brace pattern, "
                         f"a shard or a folder of *.tar)") from None


def _holds_image(folder: str) -> bool:
    """Whether `folder` or a folder under it holds a file named like an image; listing stops
    at the first (an ImageNet class folder is not read to its end)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    subfolders = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir():
                subfolders.append(entry.path)
            elif entry.name.lower().endswith(IMG_EXTENSIONS):
                return True
    return any(_holds_image(f) for f in subfolders)


def _check_imagefolder(key: str, root: str) -> None:
    """A folder of class folders, each holding an image (what torchvision's ImageFolder needs)."""
    if not os.path.exists(root):
        raise ValueError(f"{key}: no such file or folder: {root}")
    if not os.path.isdir(root):
        raise ValueError(f"{key}: {root} is not a folder (an ImageFolder tree holds one folder of images per class)")
    classes = sorted(e.path for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise ValueError(f"{key}: {root} holds no class folders (an ImageFolder tree holds one folder of images "
                         f"per class)")
    for folder in classes:
        if not _holds_image(folder):
            from torchvision.datasets.folder import IMG_EXTENSIONS

            raise ValueError(f"{key}: class folder {folder} holds no images ({', '.join(IMG_EXTENSIONS)})")


def _check_captions_csv(key: str, path: str) -> None:
    if not os.path.isfile(path):
        raise ValueError(f"{key}: no such file: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        missing = {"path", "caption"} - set(csv.DictReader(f).fieldnames or ())
    if missing:
        raise ValueError(f"{key}: {path} lacks column(s) {sorted(missing)}; the header must be path,caption")


def _check_set(key: str, path: str) -> None:
    (_check_imagefolder if os.path.isdir(path) else _check_shards)(key, path)


def check_eval_paths(cfg: EvalConfig) -> None:
    """Raise ValueError("eval.<key>: ...") for the first path of `cfg` that cannot be read:
    ImageFolder trees (class folders holding images), webdataset shards (brace patterns
    expanded; remote URLs are not checked), class-names files, probe_train and
    retrieval sets (a CSV's header). Images are not opened, so this is quick enough to run
    before training starts."""
    for name, path in cfg.imagefolders.items():
        _check_imagefolder(f"eval.imagefolders.{name}", path)
    for name, path in cfg.webdatasets.items():
        _check_shards(f"eval.webdatasets.{name}", path)
    for name, path in cfg.classnames.items():
        if not os.path.isfile(path):
            raise ValueError(f"eval.classnames.{name}: no such file: {path}")
    if cfg.probe_train and not cfg.probe_train_key():
        _check_set(f"eval.{PROBE_TRAIN}", cfg.probe_train)
    for name, path in cfg.retrieval.items():
        key = f"eval.retrieval.{name}"
        if path.lower().endswith(".csv"):
            _check_captions_csv(key, path)
        else:
            _check_shards(key, path)


@dataclass
class EvalSet:
    """Normalized image features of one evaluation set, with labels into `classnames`."""

    features: torch.Tensor
    labels: torch.Tensor
    classnames: list[str]


def domain_samples(domain: str, cfg: EvalConfig, split: str = "eval"):
    """The built-in samples of one evaluation set: `eval` (cfg.seed, samples_per_class
    per class) or `probe_train` (source domain, seed+1, probe_train_per_class per class).
    Classes are exactly balanced (every block of ten indices holds each class once)."""
    if split == "eval":
        seed, n = cfg.seed, cfg.samples_per_class
    elif split == "probe_train":
        seed, n = cfg.seed + 1, cfg.probe_train_per_class
    else:
        raise ValueError(f"split must be 'eval' or 'probe_train', got {split!r}")
    return [render_sample(i, domain, cfg.resolution, seed) for i in range(n * len(CLASSES))]


@torch.no_grad()
def _encode(model, batches, device) -> torch.Tensor:
    feats = []
    for images in batches:
        out = model.encode_image(images.to(device))
        feats.append(F.normalize(out.float(), dim=-1).cpu())
    return torch.cat(feats)


def _builtin_set(model, preprocess, domain, cfg, device, split="eval") -> EvalSet:
    samples = domain_samples(domain, cfg, split)
    tensors = [preprocess(Image.fromarray(s.image)) for s in samples]
    batches = (torch.stack(tensors[i:i + cfg.batch_size]) for i in range(0, len(tensors), cfg.batch_size))
    labels = torch.tensor([s.meta["label"] for s in samples])
    return EvalSet(_encode(model, batches, device), labels, list(CLASSES))


_WNID = re.compile(r"n\d{8}")


def read_classnames(path: str) -> list[str]:
    """A class-names file: one name per line (blank lines skipped), line i names label i."""
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        raise ValueError(f"classnames: {path} holds no class names")
    return names


def class_names(folders: list[str], names_file: str = "") -> list[str]:
    """The class names of an ImageFolder tree's (sorted) class folders: the file's lines if
    given; open_clip's ImageNet names if every folder is an ImageNet wnid (looked up in
    timm's ImageNet synset list, which open_clip already depends on; a subset such as
    ImageNet-R keeps its own wnids' names); else the folder names, '_' read as a space."""
    if names_file:
        names = read_classnames(names_file)
        if len(names) != len(folders):
            raise ValueError(f"classnames: {names_file} names {len(names)} classes, the tree has {len(folders)}")
        return names
    if folders and all(_WNID.fullmatch(f) for f in folders):
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        index = {info.index_to_label_name(i): i for i in range(info.num_classes())}
        if all(f in index for f in folders):
            import open_clip

            return [open_clip.IMAGENET_CLASSNAMES[index[f]] for f in folders]
    return [f.replace("_", " ") for f in folders]


def _imagefolder_set(model, preprocess, root, cfg, device, names_file="") -> EvalSet:
    from torchvision.datasets import ImageFolder

    data = ImageFolder(root, transform=preprocess)
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, shuffle=False, num_workers=0)
    feats = _encode(model, (x for x, _ in loader), device)
    return EvalSet(feats, torch.tensor(data.targets), class_names(data.classes, names_file))


def _skip_logger(what: str, skipped: list):
    def skip(exn: Exception) -> bool:
        skipped.append(exn)
        logger.warning("%s: skipped a sample (%s)", what, exn)
        return True

    return skip


def _webdataset_set(model, preprocess, urls, cfg, device, names_file) -> EvalSet:
    """A labelled webdataset, read in order. A sample that fails to decode, lacks a key or
    has a label outside the class list is logged and skipped (the count is logged once)."""
    import webdataset as wds

    from .data.sources import resolve_shards

    names = read_classnames(names_file)
    skipped: list[Exception] = []
    skip = _skip_logger(f"webdataset {urls}", skipped)

    def label(value) -> int:
        value = int(value)
        if not 0 <= value < len(names):
            raise ValueError(f"label {value} outside the {len(names)} classes of {names_file}")
        return value

    data = (wds.WebDataset(resolve_shards(urls), shardshuffle=False, handler=skip, empty_check=False)
            .decode("pil", handler=skip)
            .to_tuple(cfg.wds_image_key, cfg.wds_label_key, handler=skip)
            .map_tuple(preprocess, label, handler=skip)
            .batched(cfg.batch_size, partial=True))
    labels = []

    def images():
        for x, y in data:
            labels.append(torch.as_tensor(y))
            yield x

    feats = _encode(model, images(), device)
    if not labels:
        raise ValueError(f"webdatasets: no readable samples in {urls} (keys {cfg.wds_image_key!r}, "
                         f"{cfg.wds_label_key!r})")
    if skipped:
        logger.warning("webdataset %s: %d samples skipped", urls, len(skipped))
    return EvalSet(feats, torch.cat(labels), names)


def _external_set(model, preprocess, name, cfg, device) -> EvalSet:
    """An `imagefolders` tree, `webdatasets` shards, or the `probe_train` path (a folder: an
    ImageFolder tree; anything else: shards)."""
    names_file = cfg.classnames.get(name, "")
    if name == PROBE_TRAIN:
        path, folder = cfg.probe_train, os.path.isdir(cfg.probe_train)
    else:
        path, folder = {**cfg.imagefolders, **cfg.webdatasets}[name], name in cfg.imagefolders
    if folder:
        return _imagefolder_set(model, preprocess, path, cfg, device, names_file)
    return _webdataset_set(model, preprocess, path, cfg, device, names_file)


class _EvalMode:
    """Put a model in eval mode and restore its previous mode (the trainer evaluates mid-run)."""

    def __init__(self, model):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


def compute_eval_sets(model, preprocess: Callable, cfg: EvalConfig, device="cpu") -> dict[str, EvalSet]:
    """Image features of every configured domain, ImageFolder tree and webdataset (computed
    once, shared); not of the set `probe_train` names, which is the probe's alone."""
    sets: dict[str, EvalSet] = {}
    extra = cfg.extra_sets()
    with _EvalMode(model):
        for name in tqdm([*cfg.domains, *extra], desc="eval features", leave=False, disable=None):
            if name in extra:
                sets[name] = _external_set(model, preprocess, name, cfg, device)
            else:
                sets[name] = _builtin_set(model, preprocess, name, cfg, device)
    return sets


def _with_summary(prefix: str, per_set: dict[str, float], groups: dict[str, list[str]]) -> dict[str, float]:
    """Per set, plus ``source``, ``target_mean`` and each target group's mean over the
    group's domains that were evaluated (complete groups only: a partial mean would not
    compare across runs)."""
    out = {f"{prefix}/{k}": v for k, v in per_set.items()}
    if SOURCE_DOMAIN in per_set:
        out[f"{prefix}/source"] = per_set[SOURCE_DOMAIN]
    targets = [v for k, v in per_set.items() if k in DOMAINS and k != SOURCE_DOMAIN]
    if targets:
        out[f"{prefix}/target_mean"] = float(np.mean(targets))
    for group, members in groups.items():
        if all(d in per_set for d in members):
            out[f"{prefix}/{group_mean_name(group)}"] = float(np.mean([per_set[d] for d in members]))
    return out


def _zero_shot(model, tokenizer, cfg: EvalConfig, sets: dict[str, EvalSet], device):
    """(metrics, top-1 predictions per set, notes)."""
    import open_clip

    templates = cfg.template_list()
    classifiers: dict[tuple[str, ...], torch.Tensor] = {}
    accuracy, top5, predictions, no_top5 = {}, {}, {}, []
    with _EvalMode(model):
        for name, s in sets.items():
            key = tuple(s.classnames)
            if key not in classifiers:
                classifiers[key] = open_clip.build_zero_shot_classifier(
                    model, tokenizer, s.classnames, templates, device=device).float().cpu()
            logits = s.features @ classifiers[key]
            predictions[name] = logits.argmax(dim=1)
            accuracy[name] = (predictions[name] == s.labels).float().mean().item()
            if cfg.top5 and len(s.classnames) > 5:
                best = logits.topk(5, dim=1).indices
                top5[name] = (best == s.labels[:, None]).any(dim=1).float().mean().item()
            elif cfg.top5:
                no_top5.append(f"{name} ({len(s.classnames)})")
    groups = cfg.target_groups
    metrics = _with_summary(ZS_PREFIX, accuracy, groups)
    if top5:
        metrics.update(_with_summary(ZS5_PREFIX, top5, groups))
    notes = [f"zero-shot top-5 is reported for sets of more than 5 classes only, not for {', '.join(no_top5)}"] \
        if no_top5 else []
    return metrics, predictions, notes


def zero_shot_eval(model, tokenizer, preprocess: Callable, cfg: EvalConfig, device="cpu",
                   sets: dict[str, EvalSet] | None = None) -> dict[str, float]:
    """Zero-shot top-1 per domain: `eval/zeroshot_top1/<domain>`, `.../source`, `.../target_mean`
    (and, with `cfg.top5`, top-5 under `eval/zeroshot_top5/` for sets of more than 5 classes)."""
    sets = sets if sets is not None else compute_eval_sets(model, preprocess, cfg, device)
    return _zero_shot(model, tokenizer, cfg, sets, device)[0]


def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     steps: int = 100, weight_decay: float = 1e-3) -> Callable[[torch.Tensor], torch.Tensor]:
    """Multinomial logistic regression on standardized features, full-batch L-BFGS.

    Written in torch because scikit-learn is not a dependency; the problem is convex,
    so L-BFGS from zero reaches the same solution sklearn's lbfgs solver would.
    Returns a function mapping features to logits.
    """
    x = features.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, labels) + weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w, b = w.detach(), b.detach()
    return lambda f: ((f.double() - mean) / std) @ w + b


def select_weight_decay(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                        candidates: list[float], steps: int = 100) -> float:
    """Pick the L2 strength by accuracy on every 5th training sample held out (the
    CLIP paper's probe protocol sweeps it on a validation split); ties go to the
    stronger regularization."""
    if len(candidates) == 1:
        return candidates[0]
    held = torch.arange(len(labels)) % 5 == 4
    best, best_acc = candidates[0], -1.0
    for wd in sorted(candidates, reverse=True):
        probe = fit_linear_probe(features[~held], labels[~held], num_classes, steps, wd)
        acc = (probe(features[held]).argmax(1) == labels[held]).float().mean().item()
        if acc > best_acc:
            best, best_acc = wd, acc
    return best


def _class_key(name: str) -> str:
    """Class names match ignoring case, '_' and runs of spaces ("Red_Apple" is "red apple")."""
    return " ".join(name.replace("_", " ").split()).casefold()


def _probe_train_set(model, preprocess, cfg: EvalConfig, device) -> tuple[EvalSet, str]:
    """The probe's training features and what they are ("built-in source domain `flat` (500 images, 10 classes)")."""
    key = cfg.probe_train_key()
    with _EvalMode(model):
        if key:
            train = _external_set(model, preprocess, key, cfg, device)
            what = f"eval.{'imagefolders' if key in cfg.imagefolders else 'webdatasets'}.{key}"
        elif cfg.probe_train:
            train = _external_set(model, preprocess, PROBE_TRAIN, cfg, device)
            what = f"eval.probe_train={cfg.probe_train}"
        else:
            train = _builtin_set(model, preprocess, SOURCE_DOMAIN, cfg, device, split="probe_train")
            what = f"built-in source domain `{SOURCE_DOMAIN}`"
    return train, f"{what} ({len(train.labels)} images, {len(train.classnames)} classes)"


def _linear_probe(model, preprocess, cfg: EvalConfig, sets: dict[str, EvalSet], device):
    """(metrics, per set whether each image was classified right, what the probe was fit on, notes)."""
    train, fitted_on = _probe_train_set(model, preprocess, cfg, device)
    classes = train.classnames
    wd = select_weight_decay(train.features, train.labels, len(classes), cfg.probe_weight_decays, cfg.probe_steps)
    probe = fit_linear_probe(train.features, train.labels, len(classes), cfg.probe_steps, wd)
    index = {_class_key(c): i for i, c in enumerate(classes)}
    accuracy, correct, notes = {}, {}, []
    for name, s in sets.items():
        unknown = [c for c in s.classnames if _class_key(c) not in index]
        if unknown:
            shown = ", ".join(repr(c) for c in unknown[:3]) + (", ..." if len(unknown) > 3 else "")
            notes.append(f"linear probe: no number for {name}: {len(unknown)} of its {len(s.classnames)} classes "
                         f"({shown}) are not among the probe's {len(classes)}")
            logger.info(notes[-1])
            continue
        to_probe = torch.tensor([index[_class_key(c)] for c in s.classnames])
        correct[name] = probe(s.features).argmax(dim=1) == to_probe[s.labels]
        accuracy[name] = correct[name].float().mean().item()
    metrics = {**_with_summary(LP_PREFIX, accuracy, cfg.target_groups),
               f"{COUNT_PREFIX}/{PROBE_TRAIN}": float(len(train.labels))}
    return metrics, correct, fitted_on, notes


def linear_probe_eval(model, preprocess: Callable, cfg: EvalConfig, device="cpu",
                      sets: dict[str, EvalSet] | None = None) -> dict[str, float]:
    """Probe fit on training features (the built-in source domain, or ``cfg.probe_train``);
    top-1 per set whose classes the probe knows: `eval/linear_probe/<set>`, and the number of
    training images, `eval/count/probe_train`."""
    sets = sets if sets is not None else compute_eval_sets(model, preprocess, cfg, device)
    return _linear_probe(model, preprocess, cfg, sets, device)[0]


# --------------------------------------------------------------------------- retrieval

def retrieval_recall(image_features: torch.Tensor, text_features: torch.Tensor, relevant: torch.Tensor,
                     ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """Recall@k both ways from normalized features and a (images x texts) bool matrix of
    matching pairs: `i2t_r<k>` is the share of images with a matching text among their k
    most similar texts, `t2i_r<k>` the share of texts with a matching image among their k
    most similar images. A k not below the number of candidates is left out (it would be 1)."""
    sims = image_features.float() @ text_features.float().T
    out = {}
    for direction, s, rel in (("i2t", sims, relevant), ("t2i", sims.T, relevant.T)):
        for k in ks:
            if k < s.shape[1]:
                out[f"{direction}_r{k}"] = rel.gather(1, s.topk(k, dim=1).indices).any(dim=1).float().mean().item()
    return out


def _captioned_csv(name: str, path: str, cap: int, skipped: list) -> Iterator[tuple[Image.Image, list[str]]]:
    """The CSV's first `cap` image paths, each with all its non-empty captions, in file order."""
    captions: dict[str, list[str]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            image, caption = (row.get("path") or "").strip(), (row.get("caption") or "").strip()
            if not image or not caption:
                skipped.append(f"row without path or caption: {row}")
                continue
            if image in captions or len(captions) < cap:
                captions.setdefault(image, []).append(caption)
    root = Path(path).parent
    for image, texts in captions.items():
        try:
            with Image.open(root / image) as im:
                pil = im.convert("RGB")
        except Exception as err:  # noqa: BLE001 - PIL raises many types on bad bytes
            skipped.append(err)
            logger.warning("retrieval %s: skipped %s (%s)", name, image, err)
            continue
        yield pil, texts


def _captioned_shards(name: str, urls: str, cfg: EvalConfig, skipped: list) -> Iterator[tuple[Image.Image, list[str]]]:
    """The first `retrieval_max_images` samples of webdataset shards with an image and a `.txt` caption."""
    import webdataset as wds

    from .data.sources import resolve_shards

    skip = _skip_logger(f"retrieval {name}", skipped)
    data = (wds.WebDataset(resolve_shards(urls), shardshuffle=False, handler=skip, empty_check=False)
            .decode("pil", handler=skip)
            .to_tuple(cfg.wds_image_key, "txt", handler=skip))
    taken = 0
    for image, caption in data:
        if taken == cfg.retrieval_max_images:
            return
        caption = caption.strip() if isinstance(caption, str) else ""
        if not caption:
            skipped.append("empty caption")
            continue
        taken += 1
        yield image, [caption]


@torch.no_grad()
def _encode_texts(model, tokenizer, texts: list[str], batch_size: int, device) -> torch.Tensor:
    feats = [model.encode_text(tokenizer(texts[i:i + batch_size]).to(device)).float()
             for i in range(0, len(texts), batch_size)]
    return F.normalize(torch.cat(feats), dim=-1).cpu()


def _retrieval_one(model, tokenizer, preprocess, name: str, path: str, cfg: EvalConfig, device) -> dict[str, float]:
    skipped: list = []
    if path.lower().endswith(".csv"):
        pairs = _captioned_csv(name, path, cfg.retrieval_max_images, skipped)
    else:
        pairs = _captioned_shards(name, path, cfg, skipped)
    texts: dict[str, int] = {}
    matches: list[tuple[int, int]] = []
    images = 0

    def batches():
        nonlocal images
        batch = []
        for image, captions in pairs:
            matches.extend((images, texts.setdefault(c, len(texts))) for c in captions)
            images += 1
            batch.append(preprocess(image))
            if len(batch) == cfg.batch_size:
                yield torch.stack(batch)
                batch = []
        if batch:
            yield torch.stack(batch)

    image_features = _encode(model, batches(), device)
    if not images:
        raise ValueError(f"eval.retrieval.{name}: no readable image-caption pairs in {path}")
    if skipped:
        logger.warning("retrieval %s: %d samples skipped", name, len(skipped))
    relevant = torch.zeros(images, len(texts), dtype=torch.bool)
    relevant[tuple(torch.tensor(matches).T)] = True
    recall = retrieval_recall(image_features, _encode_texts(model, tokenizer, list(texts), cfg.batch_size, device),
                              relevant)
    return {**{f"{RETRIEVAL_PREFIX}/{k}/{name}": v for k, v in recall.items()},
            f"{RETRIEVAL_PREFIX}/images/{name}": float(images),
            f"{RETRIEVAL_PREFIX}/captions/{name}": float(len(texts))}


def retrieval_eval(model, tokenizer, preprocess: Callable, cfg: EvalConfig, device="cpu") -> dict[str, float]:
    """Image-text retrieval on every `cfg.retrieval` set: `eval/retrieval/{i2t,t2i}_r{1,5,10}/<name>`
    and the images and distinct captions used (`eval/retrieval/images/<name>`, `.../captions/<name>`).
    Identical captions are one text, matching each image they caption."""
    metrics: dict[str, float] = {}
    with _EvalMode(model):
        for name, path in cfg.retrieval.items():
            metrics.update(_retrieval_one(model, tokenizer, preprocess, name, path, cfg, device))
    return metrics


# --------------------------------------------------------------------------- everything

@dataclass
class SetResult:
    """One classification set's predictions: `labels` and the zero-shot top-1 `zeroshot` index
    `classnames`; `probe_correct` says per image whether the linear probe was right (None: no
    probe number for this set)."""

    classnames: list[str]
    labels: torch.Tensor
    zeroshot: torch.Tensor
    probe_correct: torch.Tensor | None = None

    def confusion(self) -> torch.Tensor:
        """Zero-shot counts: row = true class, column = predicted class."""
        n = len(self.classnames)
        return torch.bincount(self.labels * n + self.zeroshot, minlength=n * n).reshape(n, n)


@dataclass
class EvalResult:
    """`metrics` (what `evaluate` returns), each set's predictions, what the linear probe was
    fit on ("" without one) and a note for each number a set lacks."""

    metrics: dict[str, float]
    sets: dict[str, SetResult]
    probe: str = ""
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        return format_eval_table(self.metrics, self.probe, self.notes)


def evaluate_detailed(model, tokenizer, preprocess: Callable, cfg: EvalConfig, device="cpu") -> EvalResult:
    """Zero-shot (and, if cfg.linear_probe, linear probe) metrics with image counts, and
    retrieval metrics, image features computed once; with every set's predictions."""
    sets = compute_eval_sets(model, preprocess, cfg, device)
    metrics, predictions, notes = _zero_shot(model, tokenizer, cfg, sets, device)
    metrics.update({f"{COUNT_PREFIX}/{name}": float(len(s.labels)) for name, s in sets.items()})
    correct, fitted_on = {}, ""
    if cfg.linear_probe and sets:
        probe_metrics, correct, fitted_on, probe_notes = _linear_probe(model, preprocess, cfg, sets, device)
        metrics.update(probe_metrics)
        notes += probe_notes
    metrics.update(retrieval_eval(model, tokenizer, preprocess, cfg, device))
    results = {name: SetResult(s.classnames, s.labels, predictions[name], correct.get(name))
               for name, s in sets.items()}
    return EvalResult(metrics, results, fitted_on, notes)


def evaluate(model, tokenizer, preprocess: Callable, cfg: EvalConfig, device="cpu") -> dict[str, float]:
    """The metrics of :func:`evaluate_detailed` (what the trainer logs)."""
    return evaluate_detailed(model, tokenizer, preprocess, cfg, device).metrics


NOT_APPLICABLE = "–"


def _retrieval_table(metrics: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for key in metrics:
        if key.startswith(RETRIEVAL_PREFIX + "/"):
            name = key.split("/", 3)[3]
            if name not in names:
                names.append(name)
    if not names:
        return []
    recalls = [(f"{d}_r{k}", f"{'image→text' if d == 'i2t' else 'text→image'} R@{k} (%)")
               for d in ("i2t", "t2i") for k in RECALL_KS]

    def cell(metric, name, percent=True):
        value = metrics.get(f"{RETRIEVAL_PREFIX}/{metric}/{name}")
        if value is None:
            return NOT_APPLICABLE
        return f"{100 * float(value):.1f}" if percent else f"{int(value)}"

    lines = ["", "| retrieval | images | captions | " + " | ".join(t for _, t in recalls) + " |",
             "|---|" + "---:|" * (2 + len(recalls))]
    lines += ["| " + " | ".join([name, cell("images", name, False), cell("captions", name, False),
                                 *(cell(m, name) for m, _ in recalls)]) + " |" for name in names]
    return lines


def format_eval_table(metrics: dict[str, Any], probe: str = "", notes: Sequence[str] = ()) -> str:
    """A markdown table: one row per domain (source first; with its image count when
    `eval/count/*` is there), then the target mean and each target group's mean, top-1 in %,
    "–" where a number does not apply; a retrieval table when there are retrieval metrics;
    then what the linear probe was fit on (`probe`) and the `notes`."""
    columns = ((ZS_PREFIX, "zero-shot top-1 (%)"), (ZS5_PREFIX, "zero-shot top-5 (%)"),
               (LP_PREFIX, "linear probe top-1 (%)"))
    names: list[str] = []
    for key in metrics:
        for prefix, _ in columns:
            if key.startswith(prefix + "/"):
                name = key[len(prefix) + 1:]
                if name not in names and name not in _SUMMARY:
                    names.append(name)
    means = [n for n in names if n.endswith("_mean")]
    names = [n for n in names if n not in means]
    names.sort(key=lambda n: (n != SOURCE_DOMAIN, DOMAINS.index(n) if n in DOMAINS else len(DOMAINS)))
    rows = [*names, "target_mean"] if any(k.endswith("/target_mean") for k in metrics) else names
    rows += means
    used = [(p, title) for p, title in columns if any(k.startswith(p + "/") for k in metrics)]
    counts = any(f"{COUNT_PREFIX}/{n}" in metrics for n in names)
    label = {SOURCE_DOMAIN: f"{SOURCE_DOMAIN} (source)", "target_mean": "target mean",
             **{m: m[:-len("_mean")].replace("_", "-") + " mean" for m in means}}

    def cell(prefix, name):
        value = metrics.get(f"{prefix}/{name}")
        return NOT_APPLICABLE if value is None else f"{100 * float(value):.1f}"

    def count(name):
        value = metrics.get(f"{COUNT_PREFIX}/{name}")
        return [] if not counts else ["" if value is None else str(int(value))]

    lines = []
    if rows:
        lines = ["| domain | " + "images | " * counts + " | ".join(t for _, t in used) + " |",
                 "|---|" + "---:|" * (len(used) + counts)]
        lines += ["| " + " | ".join([label.get(n, n), *count(n), *(cell(p, n) for p, _ in used)]) + " |"
                  for n in rows]
    lines += _retrieval_table(metrics)
    if probe:
        lines.append(f"linear probe fitted on: {probe}")
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines).strip("\n")
