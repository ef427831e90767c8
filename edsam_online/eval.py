"""Evaluation under domain shift: zero-shot top-1 and a linear probe, per domain.

The ED-SAM question is how a CLIP trained on the source domain alone holds up on
shifted targets. For every built-in domain (and any ImageFolder tree or labelled
webdataset the user points at) this reports

* zero-shot top-1: open_clip's `build_zero_shot_classifier` over a template list
  (see `template_set`), cosine similarity to the image embedding, argmax;
* linear probe top-1: a logistic-regression head fit on frozen image features of
  *source* training images only (L2 strength picked on a held-out fifth of them),
  then applied to every domain.

Metric keys: `eval/zeroshot_top1/<domain>`, `eval/linear_probe/<domain>`, plus
`.../source` (the source domain), `.../target_mean` (mean over built-in targets) and
`.../<group>_mean` for each target group (`EvalConfig.target_groups`).
Evaluation images use their own seed (default 1000, training data defaults to 0)
and the probe trains on seed+1, so nothing evaluated was trained on.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

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
    `+eval.imagefolders.pacs_sketch=/data/pacs/sketch`). webdatasets: extra name -> shard
    URL or brace pattern of a webdataset whose samples hold an image (`wds_image_key`) and
    an integer label (`wds_label_key`). Class names (see `class_names`): a file in
    `classnames[name]` (one name per line, line i is label i; for ImageFolder, label i is
    the i-th folder in sorted order); else, for ImageFolder, the folder names, or
    open_clip's ImageNet class names when every folder is an ImageNet wnid (n01440764 …,
    also for subsets such as ImageNet-R); a webdataset needs the file.
    probe_train: an ImageFolder tree or webdataset shards (a path that is not a folder) to
    fit the linear probe on, instead of the built-in source domain (its class names come
    the same way, `classnames.probe_train` for a file); the probe then scores every set
    whose classes are among its own.
    templates: one of TEMPLATE_SET_NAMES, or a text file with one template per line, each
    holding "{}" where the class name goes. top5: also report zero-shot top-5
    (`eval/zeroshot_top5/...`). probe_weight_decays: L2 strengths to choose from.
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
        self.classnames = dict(self.classnames)
        self.probe_weight_decays = [float(w) for w in self.probe_weight_decays]
        unknown = [d for d in self.domains if d not in DOMAINS]
        if unknown:
            raise ValueError(f"domains: unknown {unknown}, choose from {list(DOMAINS)}")
        if not self.domains and not self.imagefolders and not self.webdatasets:
            raise ValueError("domains: nothing to evaluate (no domains, imagefolders or webdatasets)")
        require_at_least(self, 1, "samples_per_class", "batch_size", "probe_train_per_class", "probe_steps")
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
                 or extra.count(n) > 1]
        if clash:
            raise ValueError(f"imagefolders/webdatasets: names {clash} clash with built-in domains, {summary}, "
                             f"each other, or contain '/' or end in '_mean'")
        for name, path in self.classnames.items():
            if name not in extra and name != "probe_train":
                raise ValueError(f"classnames.{name}: no imagefolders/webdatasets entry (or probe_train) of that name")
            if not os.path.isfile(path):
                raise ValueError(f"classnames.{name}: no class-names file at {path!r}")
        needs_file = [n for n in self.webdatasets if n not in self.classnames]
        if self.probe_train and not os.path.isdir(self.probe_train) and "probe_train" not in self.classnames:
            needs_file.append("probe_train")
        if needs_file:
            raise ValueError(f"classnames: webdataset sets {needs_file} need a class-names file "
                             f"(+eval.classnames.NAME=FILE, one class name per line, line i is label i)")

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


def _webdataset_set(model, preprocess, urls, cfg, device, names_file) -> EvalSet:
    """A labelled webdataset, read in order. A sample that fails to decode, lacks a key or
    has a label outside the class list is logged and skipped (the count is logged once)."""
    import webdataset as wds

    names = read_classnames(names_file)
    skipped = []

    def skip(exn: Exception) -> bool:
        skipped.append(exn)
        logger.warning("webdataset %s: skipped a sample (%s)", urls, exn)
        return True

    def label(value) -> int:
        value = int(value)
        if not 0 <= value < len(names):
            raise ValueError(f"label {value} outside the {len(names)} classes of {names_file}")
        return value

    data = (wds.WebDataset(urls, shardshuffle=False, handler=skip, empty_check=False)
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


def _external_set(model, preprocess, name, path, cfg, device) -> EvalSet:
    """An ImageFolder tree (a folder) or webdataset shards (anything else)."""
    names_file = cfg.classnames.get(name, "")
    if os.path.isdir(path):
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
    once, shared)."""
    sets: dict[str, EvalSet] = {}
    extra = {**cfg.imagefolders, **cfg.webdatasets}
    with _EvalMode(model):
        for name in tqdm([*cfg.domains, *extra], desc="eval features", leave=False, disable=None):
            if name in extra:
                sets[name] = _external_set(model, preprocess, name, extra[name], cfg, device)
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


def zero_shot_eval(model, tokenizer, preprocess: Callable, cfg: EvalConfig, device="cpu",
                   sets: dict[str, EvalSet] | None = None) -> dict[str, float]:
    """Zero-shot top-1 per domain: `eval/zeroshot_top1/<domain>`, `.../source`, `.../target_mean`
    (and top-5 under `eval/zeroshot_top5/` with `cfg.top5`)."""
    sets = sets if sets is not None else compute_eval_sets(model, preprocess, cfg, device)
    import open_clip

    templates = cfg.template_list()
    classifiers: dict[tuple[str, ...], torch.Tensor] = {}
    accuracy, top5 = {}, {}
    with _EvalMode(model):
        for name, s in sets.items():
            key = tuple(s.classnames)
            if key not in classifiers:
                classifiers[key] = open_clip.build_zero_shot_classifier(
                    model, tokenizer, s.classnames, templates, device=device).float().cpu()
            logits = s.features @ classifiers[key]
            accuracy[name] = (logits.argmax(dim=1) == s.labels).float().mean().item()
            if cfg.top5:
                best = logits.topk(min(5, logits.shape[1]), dim=1).indices
                top5[name] = (best == s.labels[:, None]).any(dim=1).float().mean().item()
    groups = cfg.target_groups
    return {**_with_summary(ZS_PREFIX, accuracy, groups), **(_with_summary(ZS5_PREFIX, top5, groups) if top5 else {})}


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


def linear_probe_eval(model, preprocess: Callable, cfg: EvalConfig, device="cpu",
                      sets: dict[str, EvalSet] | None = None) -> dict[str, float]:
    """Probe fit on training features (the built-in source domain, or ``cfg.probe_train``);
    top-1 per set whose classes the probe knows: `eval/linear_probe/<set>`."""
    sets = sets if sets is not None else compute_eval_sets(model, preprocess, cfg, device)
    with _EvalMode(model):
        if cfg.probe_train:
            train = _external_set(model, preprocess, "probe_train", cfg.probe_train, cfg, device)
        else:
            train = _builtin_set(model, preprocess, SOURCE_DOMAIN, cfg, device, split="probe_train")
    classes = train.classnames
    wd = select_weight_decay(train.features, train.labels, len(classes), cfg.probe_weight_decays, cfg.probe_steps)
    probe = fit_linear_probe(train.features, train.labels, len(classes), cfg.probe_steps, wd)
    accuracy = {}
    for name, s in sets.items():
        if not set(s.classnames) <= set(classes):
            logger.info("linear probe skips %s: its classes are not all among the probe's", name)
            continue
        to_probe = torch.tensor([classes.index(c) for c in s.classnames])
        pred = probe(s.features).argmax(dim=1)
        accuracy[name] = (pred == to_probe[s.labels]).float().mean().item()
    return _with_summary(LP_PREFIX, accuracy, cfg.target_groups)


def evaluate(model, tokenizer, preprocess: Callable, cfg: EvalConfig, device="cpu") -> dict[str, float]:
    """Zero-shot (and, if cfg.linear_probe, linear probe) metrics, image features computed once."""
    sets = compute_eval_sets(model, preprocess, cfg, device)
    metrics = zero_shot_eval(model, tokenizer, preprocess, cfg, device, sets)
    if cfg.linear_probe:
        metrics.update(linear_probe_eval(model, preprocess, cfg, device, sets))
    return metrics


def format_eval_table(metrics: dict[str, Any]) -> str:
    """A markdown table: one row per domain (source first), then the target mean and each
    target group's mean, top-1 in %."""
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
    label = {SOURCE_DOMAIN: f"{SOURCE_DOMAIN} (source)", "target_mean": "target mean",
             **{m: m[:-len("_mean")].replace("_", "-") + " mean" for m in means}}

    def cell(prefix, name):
        value = metrics.get(f"{prefix}/{name}")
        return "-" if value is None else f"{100 * float(value):.1f}"

    lines = ["| domain | " + " | ".join(t for _, t in used) + " |",
             "|---|" + "---:|" * len(used)]
    lines += ["| " + label.get(n, n) + " | " + " | ".join(cell(p, n) for p, _ in used) + " |" for n in rows]
    return "\n".join(lines)
