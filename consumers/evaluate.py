"""``edsam-eval`` (``python -m consumers.evaluate``): zero-shot and linear-probe accuracy of
a trained CLIP, or of any open_clip model, on the built-in domains, ImageFolder trees and
labelled webdatasets, and image-text retrieval on captioned sets.

    edsam-eval checkpoint=runs/<time>                        # a run folder: its newest checkpoint and model
    edsam-eval checkpoint=runs/<time>/checkpoints/step_00000600.pt model=tiny_rn
    edsam-eval model.name=ViT-B-32 model.pretrained=openai eval.templates=openai eval.resolution=224
    edsam-eval checkpoint=runs/<time> +eval.imagefolders.pacs_sketch=/data/pacs/sketch eval.domains=[flat]
    edsam-eval model.name=ViT-B-32 model.pretrained=openai eval.domains=[] eval.resolution=224 \
        eval.templates=openai +eval.imagefolders.imagenet_r=/data/imagenet-r      # wnid folders: ImageNet names
    edsam-eval checkpoint=runs/<time> +eval.webdatasets.test='/data/t/{0000..0009}.tar' \
        +eval.classnames.test=names.txt eval.probe_train='/data/tr/{0000..0099}.tar' +eval.classnames.probe_train=names.txt
    edsam-eval checkpoint=runs/<time> eval.domains=[] +eval.imagefolders.train=/data/pacs/photo \
        +eval.imagefolders.sketch=/data/pacs/sketch eval.probe_train=train     # probe fit on a named split
    edsam-eval checkpoint=runs/<time> +eval.retrieval.coco=/data/coco_val.csv eval.retrieval_max_images=5000

``model=tiny|tiny_rn|rn50|vit_b16`` picks an architecture from ``configs/model`` (the only
config group edsam-eval has). A run folder's model is the one its ``hydra/config.yaml``
names; a bare checkpoint file needs ``model.*`` to describe it. Checkpoints load with
``weights_only=True``. Every path ``eval.*`` names is checked before a model is built (a
missing one exits with ``config error: eval.<key>: ...``).

Prints a markdown table (images, zero-shot top-1 and top-5, linear probe top-1, per set and
the means over the built-in target domains; a retrieval table; what the linear probe was fit
on and why a set lacks a number) and writes to ``out_dir`` (default: ``<run folder>/eval``,
or ``eval-<model name>`` without one):

* ``metrics.json``, ``metrics.csv`` (columns metric,set,value): every metric, image counts
  (``eval/count/<set>``) included;
* ``per_class.csv``: one row per set and class: set, class, images, zeroshot_top1,
  linear_probe_top1 (accuracy in [0, 1]; empty where the class has no images or the set no
  probe number);
* ``confusion_<set>.csv``: the zero-shot confusion matrix of each set, one row per true
  class, one column per predicted class (the header row names them), image counts;
* ``info.json``: the model evaluated, what the linear probe was fit on, and the notes.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from edsam_online.checkpoint import list_checkpoints, load_checkpoint
from edsam_online.config import or_exit
from edsam_online.eval import EvalConfig, EvalResult, check_eval_paths, evaluate_detailed
from edsam_online.models import ClipModelConfig, create_clip

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


@dataclass
class EvaluateConfig:
    """What ``edsam-eval`` evaluates: ``checkpoint`` (a run folder, a ``step_*.pt`` file, or
    ``""`` for the open_clip model ``model`` names as it is), on ``eval``'s sets."""

    checkpoint: str = ""
    model: ClipModelConfig = field(default_factory=ClipModelConfig)
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(top5=True))
    out_dir: str = ""
    device: str = "cpu"


ConfigStore.instance().store(name="evaluate_config", node=EvaluateConfig)
# configs/evaluate.yaml's --help lists the model group's options through this
OmegaConf.register_new_resolver(
    "edsam_eval_models", lambda: ", ".join(sorted(p.stem for p in Path(CONFIG_DIR, "model").glob("*.yaml"))),
    replace=True)


def resolve(cfg: EvaluateConfig) -> tuple[ClipModelConfig, Path | None, Path]:
    """(the model's config, the checkpoint file or None, the output folder)."""
    path = Path(cfg.checkpoint) if cfg.checkpoint else None
    model_cfg, out = cfg.model, Path(cfg.out_dir) if cfg.out_dir else None
    if path is not None and path.is_dir():
        found = list_checkpoints(path)
        if not found:
            raise ValueError(f"checkpoint: no checkpoints/step_*.pt under the run folder {path}")
        run_config = path / "hydra" / "config.yaml"
        if run_config.is_file():
            model_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ClipModelConfig),
                                                            OmegaConf.load(run_config).model))
        out = out or path / "eval"
        path = found[-1]
    elif path is not None and not path.is_file():
        raise ValueError(f"checkpoint: no run folder or checkpoint file at {cfg.checkpoint!r}")
    return model_cfg, path, out or Path(f"eval-{model_cfg.name}")


def write_results(result: EvalResult, out: Path, model: str = "") -> list[Path]:
    """Write metrics.json, metrics.csv, per_class.csv, confusion_<set>.csv and info.json
    (see the module docstring); returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "metrics.json", out / "metrics.csv", out / "per_class.csv"]
    written[0].write_text(json.dumps(result.metrics, indent=1, sort_keys=True))
    with open(written[1], "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["metric", "set", "value"])
        for key, value in sorted(result.metrics.items()):
            metric, _, name = key.rpartition("/")
            writer.writerow([metric, name, value])
    with open(written[2], "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["set", "class", "images", "zeroshot_top1", "linear_probe_top1"])
        for name, s in result.sets.items():
            for i, cls in enumerate(s.classnames):
                mask = s.labels == i
                n = int(mask.sum())
                zs = int((s.zeroshot[mask] == i).sum()) / n if n else ""
                lp = int(s.probe_correct[mask].sum()) / n if n and s.probe_correct is not None else ""
                writer.writerow([name, cls, n, zs, lp])
    for name, s in result.sets.items():
        path = out / f"confusion_{name}.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["true \\ predicted", *s.classnames])
            for cls, row in zip(s.classnames, s.confusion().tolist()):
                writer.writerow([cls, *row])
        written.append(path)
    written.append(out / "info.json")
    written[-1].write_text(json.dumps({"model": model, "linear_probe_fitted_on": result.probe,
                                       "notes": result.notes}, indent=1))
    return written


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="evaluate")
def main(dictcfg: DictConfig) -> None:
    cfg: EvaluateConfig = or_exit(lambda: OmegaConf.to_object(dictcfg))
    or_exit(lambda: check_eval_paths(cfg.eval))
    model_cfg, ckpt, out = or_exit(lambda: resolve(cfg))
    model, _, preprocess_val, tokenizer = create_clip(model_cfg, device=cfg.device)
    if ckpt is not None:
        load_checkpoint(ckpt, model)
    result = evaluate_detailed(model, tokenizer, preprocess_val, cfg.eval, device=cfg.device)
    source = f"{ckpt}" if ckpt is not None else f"{model_cfg.name} ({model_cfg.pretrained or 'random weights'})"
    written = write_results(result, out, source)
    print(f"{source}\n{result.table()}\nwritten to {out}: {', '.join(p.name for p in written)}", flush=True)


if __name__ == "__main__":
    main()
