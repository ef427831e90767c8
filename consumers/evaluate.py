"""``edsam-eval`` (``python -m consumers.evaluate``): zero-shot and linear-probe accuracy of
a trained CLIP, or of any open_clip model, on the built-in domains, ImageFolder trees and
labelled webdatasets.

    edsam-eval checkpoint=runs/<time>                        # a run folder: its newest checkpoint and model
    edsam-eval checkpoint=runs/<time>/checkpoints/step_00000600.pt model.name=edsam-tiny-rn
    edsam-eval model.name=ViT-B-32 model.pretrained=openai eval.templates=openai eval.resolution=224
    edsam-eval checkpoint=runs/<time> +eval.imagefolders.pacs_sketch=/data/pacs/sketch eval.domains=[flat]
    edsam-eval model.name=ViT-B-32 model.pretrained=openai eval.domains=[] eval.resolution=224 \
        eval.templates=openai +eval.imagefolders.imagenet_r=/data/imagenet-r      # wnid folders: ImageNet names
    edsam-eval checkpoint=runs/<time> +eval.webdatasets.test='/data/t/{0000..0009}.tar' \
        +eval.classnames.test=names.txt eval.probe_train='/data/tr/{0000..0099}.tar' +eval.classnames.probe_train=names.txt

Prints a markdown table (zero-shot top-1 and top-5, linear probe top-1, per set and the
mean over the built-in target domains) and writes ``metrics.json`` and ``metrics.csv`` to
``out_dir`` (default: ``<run folder>/eval``, or ``eval-<model name>`` without one). A run
folder's model is the one its ``hydra/config.yaml`` names; a bare checkpoint file needs
``model.*`` to describe it. Checkpoints load with ``weights_only=True``. The linear probe
is fit on the built-in source domain, or on ``eval.probe_train`` (an ImageFolder tree or
webdataset shards), and scores the sets whose classes it knows.
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
from edsam_online.eval import EvalConfig, evaluate, format_eval_table
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


def write_results(metrics: dict[str, float], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    with open(out / "metrics.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["metric", "set", "value"])
        for key, value in sorted(metrics.items()):
            metric, _, name = key.rpartition("/")
            writer.writerow([metric, name, value])


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="evaluate")
def main(dictcfg: DictConfig) -> None:
    cfg: EvaluateConfig = or_exit(lambda: OmegaConf.to_object(dictcfg))
    model_cfg, ckpt, out = or_exit(lambda: resolve(cfg))
    model, _, preprocess_val, tokenizer = create_clip(model_cfg, device=cfg.device)
    if ckpt is not None:
        load_checkpoint(ckpt, model)
    metrics = evaluate(model, tokenizer, preprocess_val, cfg.eval, device=cfg.device)
    write_results(metrics, out)
    source = f"{ckpt}" if ckpt is not None else f"{model_cfg.name} ({model_cfg.pretrained or 'random weights'})"
    print(f"{source}\n{format_eval_table(metrics)}\nwritten: {out}/metrics.json, {out}/metrics.csv", flush=True)


if __name__ == "__main__":
    main()
