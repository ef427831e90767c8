"""What ``edsam-eval`` runs (``consumers/evaluate.py`` is its light entry point): its config,
the model and checkpoint it resolves, and the files it writes."""

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
def run(dictcfg: DictConfig) -> None:
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
