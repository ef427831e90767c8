"""One validation pass before any work: ``python -m edsam_online.preflight [--plan] OVERRIDES``.

``scripts/launch.sh`` (``--dry-run`` included) runs it before it makes a run folder or starts
a process, and every Hydra entry point (``edsam-train``, ``edsam-produce``,
``edsam-prepare``) runs the same checks on its own command line, so a mistake costs seconds,
not a training run. It composes the one config tree all roles read (producer, trainer,
evaluation) and stops at the first problem with one line that names the full key, exit 2:

* an unknown key, with a "did you mean" from the component dataclass's fields;
* an unknown group option, a value of the wrong type, a bad value or a required key not set;
* a data, evaluation, generator, CLIP or checkpoint path that does not exist, and a shard
  pattern that matches nothing.

It warns, naming the key to set, where the run would silently keep a demo setting on real
data: the shipped generator (trained on built-in shapes), a tiny CLIP at 32 px, or evaluation
on the built-in shapes alone. ``--plan`` also prints what ``scripts/launch.sh`` starts
(:func:`launch_plan`): ``prepare yes|no`` and ``producers yes|no``.

Hydra's own errors say neither the full key of a type error nor a near miss of an unknown
one, and its override parser stops at shell brace patterns; :func:`compose_checked` turns
each into that one line (and :mod:`edsam_online.cli` quotes brace patterns first).
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from edsam_online.cli import CONFIG_DIR, group_options, quote_brace_patterns
from edsam_online.config import Config, load_config
from edsam_online.diffusion.config import RETRAINED, TINY_RANDOM, needs_preparing

# Generators and CLIPs that exist only for the built-in data and CPU demos.
DEMO_GENERATORS = (RETRAINED, TINY_RANDOM)
DEMO_CLIPS = ("edsam-tiny", "edsam-tiny-rn")


class PreflightError(ValueError):
    """A config that must not start: the message is one line, ``<full key>: <why>``."""


def _first_line(text: str) -> str:
    return str(text).strip().splitlines()[0] if str(text).strip() else ""


def _keys_at(dotted_parent: str) -> list[str]:
    """The keys the typed tree has under ``dotted_parent`` ("" = the root)."""
    node = OmegaConf.structured(Config)
    if dotted_parent:
        node = OmegaConf.select(node, dotted_parent)
    return list(node.keys()) if isinstance(node, DictConfig) else []


def unknown_key_message(full_key: str) -> str:
    # walk down to the deepest parent that exists: trainer.stepz.x -> trainer.stepz unknown
    parts = full_key.split(".")
    for depth in range(1, len(parts) + 1):
        parent, name = ".".join(parts[:depth - 1]), parts[depth - 1]
        if name not in _keys_at(parent):
            break
    near = difflib.get_close_matches(name, _keys_at(parent), n=1, cutoff=0.6)
    key = f"{parent}.{name}" if parent else name
    hint = f" (did you mean {parent + '.' if parent else ''}{near[0]}?)" if near else \
        f" ({parent or 'the root'} has: {', '.join(_keys_at(parent))})"
    return f"{key}: unknown key{hint}"


def _bad_override(overrides: list[str]) -> str:
    """The override Hydra's parser rejects, as ``<key>: cannot parse ...``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except OverrideParseException as err:
            key = override.split("=", 1)[0].lstrip("+~")
            return (f"{key}: cannot parse {override!r} ({_first_line(err)}); quote a value with special "
                    f"characters: {key}=\"'...'\"")
    return "overrides: cannot parse them"


def _group_message(err: MissingConfigException) -> str:
    group = str(getattr(err, "config_name", "") or "").split("/")[0]
    for g, options in group_options().items():
        if f"'{g}/" in str(err):
            group = g
            wanted = str(err).split(f"'{g}/", 1)[1].split("'", 1)[0]
            near = difflib.get_close_matches(wanted, options, n=1)
            hint = f"did you mean {g}={near[0]}? " if near else ""
            return f"{g}: no option {wanted!r} ({hint}choose one of {', '.join(options)})"
    return f"{group or 'config'}: {_first_line(err)}"


def compose_checked(overrides: list[str], config_name: str = "config") -> tuple[DictConfig, Config]:
    """(the composed tree, the typed config), or :class:`PreflightError` naming the key."""
    overrides = quote_brace_patterns(list(overrides))
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            dictcfg = compose(config_name, overrides=overrides)
    except OverrideParseException:
        raise PreflightError(_bad_override(overrides)) from None
    except MissingConfigException as err:
        raise PreflightError(_group_message(err)) from None
    except HydraException as err:
        cause = err.__cause__
        full_key = getattr(cause, "full_key", None)
        if isinstance(cause, (KeyError, AttributeError)) and full_key:
            raise PreflightError(unknown_key_message(str(full_key))) from None
        if full_key:
            raise PreflightError(f"{full_key}: {_first_line(cause)}") from None
        raise PreflightError(f"overrides: {_first_line(err)}") from None
    return dictcfg, typed(dictcfg)


def _added_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """Keys that ``+key=value`` added to a typed section whose dataclass lacks them (Hydra lets
    ``+`` add to a structured node, and the dataclass would then drop the value unseen)."""
    typ = OmegaConf.get_type(node)
    known = {f.name for f in dataclasses.fields(typ)} if dataclasses.is_dataclass(typ) else None
    out = []
    for key in node.keys():
        full = f"{prefix}{key}"
        if known is not None and key not in known:
            out.append(full)
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            out += _added_keys(child, f"{full}.")
    return out


def typed(dictcfg: DictConfig) -> Config:
    """:func:`edsam_online.config.load_config` with every failure as one keyed line."""
    added = _added_keys(dictcfg)
    if added:
        raise PreflightError(unknown_key_message(added[0]))
    missing = sorted(OmegaConf.missing_keys(dictcfg))
    if missing:
        raise PreflightError(f"{missing[0]}: required, not set (set {missing[0]}=... on the command line)")
    try:
        return load_config(dictcfg)
    except OmegaConfBaseException as err:
        raise PreflightError(f"{getattr(err, 'full_key', None) or 'config'}: {_first_line(err)}") from None
    except ValueError as err:
        raise PreflightError(_first_line(err)) from None


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or value.endswith((".pt", ".pth", ".bin", ".safetensors"))


def check_paths(cfg: Config) -> None:
    """Every path the config names exists, every shard pattern matches files: else
    :class:`PreflightError` naming the key. Nothing is read beyond ``stat``."""
    from edsam_online.data.sources import resolve_shards
    from edsam_online.eval import check_eval_paths

    data = cfg.data
    if data.kind == "webdataset":
        _keyed("data.path", lambda: resolve_shards(data.path))
    elif data.kind == "csv" and not Path(data.path).is_file():
        raise PreflightError(f"data.path: no CSV file at {data.path!r}")
    elif data.kind == "imagefolder" and not Path(data.path).is_dir():
        raise PreflightError(f"data.path: no folder at {data.path!r}")
    if cfg.method.offline_shards:
        _keyed("method.offline_shards", lambda: resolve_shards(cfg.method.offline_shards))
    _keyed("eval", lambda: check_eval_paths(cfg.eval), prefix=False)
    generator = cfg.diffusion.model
    if _looks_like_path(generator) and not (Path(generator).expanduser() / "model_index.json").is_file():
        raise PreflightError(f"diffusion.model: no diffusers folder (model_index.json) at {generator!r}")
    if cfg.model.name.startswith("local-dir:"):
        folder = Path(cfg.model.name.removeprefix("local-dir:")).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise PreflightError(f"model.name: no open_clip folder (open_clip_config.json) at {str(folder)!r}")
    for key, value in (("model.pretrained", cfg.model.pretrained), ("checkpoint.resume", cfg.checkpoint.resume),
                       ("producer.scorer_pretrained", cfg.producer.scorer_pretrained)):
        if value and _looks_like_path(str(value)) and not Path(str(value)).expanduser().is_file():
            raise PreflightError(f"{key}: no file at {value!r}")
    if cfg.stream.curve:
        for name in ("curve_server_public", "curve_server_secret", "curve_client_secret"):
            value = getattr(cfg.stream, name)
            if value and not Path(value).is_file():
                raise PreflightError(f"stream.{name}: no key file at {value!r}")
        if cfg.stream.curve_allow_dir and not Path(cfg.stream.curve_allow_dir).is_dir():
            raise PreflightError(f"stream.curve_allow_dir: no folder at {cfg.stream.curve_allow_dir!r}")


def _keyed(key: str, check, prefix: bool = True) -> None:
    """Run ``check``; a ``ValueError`` it raises becomes a :class:`PreflightError` on ``key``."""
    try:
        check()
    except ValueError as err:
        message = _first_line(err)
        if prefix:  # "path: 2 shard(s) not found" from the data reader -> "data.path: ..."
            message = f"{key}: {message.split(': ', 1)[1] if message.startswith(key.rsplit('.', 1)[-1] + ':') else message}"
        raise PreflightError(message) from None


def warnings(cfg: Config) -> list[str]:
    """Settings the demo needs that a run on real data almost surely does not, each naming the
    key to set. A warning does not stop the run."""
    if cfg.data.kind == "builtin":
        return []
    out = []
    if cfg.method.extra_batch == "stream" and cfg.diffusion.model in DEMO_GENERATORS:
        out.append(f"diffusion.model={cfg.diffusion.model} was trained on the built-in shapes, not on "
                   f"data.kind={cfg.data.kind}: set diffusion.model to your generator's folder "
                   f"(experiment=sd_1gpu or sd_2gpu, or diffusion=ldm_text2im_256)")
    if cfg.model.name in DEMO_CLIPS:
        out.append(f"model.name={cfg.model.name} is a tiny CPU CLIP at 32 px: set model (e.g. model=vit_b32) "
                   f"for data.kind={cfg.data.kind}")
    if not (cfg.eval.imagefolders or cfg.eval.webdatasets) and cfg.eval.domains:
        out.append("eval: only the built-in shape domains are evaluated; add your sets with "
                   "+eval.imagefolders.NAME=DIR or +eval.webdatasets.NAME=SHARDS (and eval.domains=[] "
                   "to drop the shapes)")
    return out


def check(cfg: Config) -> list[str]:
    """:func:`check_paths`, then the :func:`warnings` to print."""
    check_paths(cfg)
    return warnings(cfg)


# Hydra's options that take a value, and those after which it runs no job (nothing to check).
_VALUED = {"--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd"}
_NO_JOB = {"--cfg", "-c", "--info", "-i", "--hydra-help", "--shell-completion", "-sc", "--multirun", "-m"}


def _overrides(argv: list[str]) -> list[str]:
    """The Hydra overrides of a command line (not options, their values, or ``hydra.*``)."""
    out, skip = [], False
    for arg in argv:
        if skip or arg.startswith("-"):
            skip = arg in _VALUED
            continue
        if not arg.lstrip("+~").startswith("hydra."):
            out.append(arg)
    return out


def preflight(argv: list[str], config_name: str = "config") -> Config | None:
    """Compose and check ``argv``'s overrides; print warnings; exit 2 with one line on a
    problem. None (nothing checked) when Hydra is asked to print rather than run."""
    if _NO_JOB & set(argv):
        return None
    try:
        _, cfg = compose_checked(_overrides(argv), config_name)
        found = check(cfg)
    except PreflightError as err:
        print(f"config error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    for line in found:
        print(f"config warning: {line}", file=sys.stderr, flush=True)
    return cfg


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    plan = "--plan" in argv
    cfg = preflight([a for a in argv if a != "--plan"])
    if plan and cfg is not None:
        for what, needed in launch_plan(cfg).items():
            print(what, "yes" if needed else "no")


def launch_plan(cfg: Config) -> dict[str, bool]:
    """What ``scripts/launch.sh`` starts for ``cfg`` (``--plan`` prints it): ``prepare``,
    ``python -m producers.prepare`` once (a generator that :func:`needs_preparing`, or a
    fidelity scorer to fit or load), and ``producers``, whether the method generates at all
    (methods without a generator, and offline shards, run no producer)."""
    producers = cfg.method.extra_batch == "stream"
    prepare = producers and (needs_preparing(cfg.diffusion.model) or cfg.producer.scorer != "none")
    return {"prepare": prepare, "producers": producers}


if __name__ == "__main__":
    main()
