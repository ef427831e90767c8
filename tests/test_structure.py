"""The repository's structure holds: one home for every default, no import cycle in the library,
no library module importing a layer above its own, short functions, a light config, and a
library that never imports its processes."""

from __future__ import annotations

import ast
import dataclasses
import math
import re
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from edsam_online.config import Config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
LIBRARY = ROOT / "edsam_online"

#: (group/option, key) pairs that may restate a dataclass default: an option names what it selects.
INTENTIONAL = {
    ("data/builtin", "data.kind"),
    ("diffusion/retrained", "diffusion.model"),
    ("model/tiny", "model.name"),
    ("method/edsam", "method.name"),
}


def _leaves(node: dict, prefix: str = ""):
    for key, value in node.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _default(key: str):
    """The dataclass default at a dotted key of ``Config`` (a KeyError when there is none)."""
    value = Config()
    for part in key.split("."):
        if not dataclasses.is_dataclass(value) or part not in {f.name for f in dataclasses.fields(value)}:
            raise KeyError(key)
        value = getattr(value, part)
    return value


def restated_defaults(group: str, option: str, path: Path) -> list[str]:
    """Keys a group option's YAML sets to the value its dataclass already has by default.

    A group option's keys live under the group's name; an option in ``@package _global_``
    (experiments, methods) sets keys of the whole tree. The ``defaults`` list is not a value."""
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    node.pop("defaults", None)
    is_global = "# @package _global_" in Path(path).read_text().splitlines()[:3]
    tree = node if is_global else {group: node}
    found = []
    for key, value in _leaves(tree):
        if (f"{group}/{option}", key) in INTENTIONAL:
            continue
        try:
            default = _default(key)
        except KeyError:
            continue  # not a default anyone could restate (composing the real configs rejects unknown keys)
        if value == default:
            found.append(key)
    return found


def _options():
    for group_dir in sorted(p for p in CONFIGS.iterdir() if p.is_dir()):
        for path in sorted(group_dir.glob("*.yaml")):
            yield group_dir.name, path.stem, path


@pytest.mark.parametrize("group,option,path", list(_options()), ids=lambda v: str(v) if isinstance(v, str) else "")
def test_no_config_option_restates_a_dataclass_default(group, option, path):
    assert restated_defaults(group, option, path) == []


def test_the_defaults_check_catches_a_restated_default(tmp_path):
    option = tmp_path / "big.yaml"
    option.write_text("capacity: 4096\nmin_size_to_sample: 8\n")
    assert restated_defaults("buffer", "big", option) == ["buffer.capacity"]
    experiment = tmp_path / "exp.yaml"
    experiment.write_text("# @package _global_\ndefaults:\n  - override /model: tiny_rn\n"
                          "trainer:\n  steps: 200\n  batch_size: 48\noptim:\n  lr: 5.0e-4\n")
    assert restated_defaults("experiment", "exp", experiment) == ["trainer.steps", "optim.lr"]


def test_the_root_config_file_sets_no_component_default():
    node = OmegaConf.to_container(OmegaConf.load(CONFIGS / "config.yaml"), resolve=False)
    assert set(node) == {"defaults", "run_dir", "hydra"}


# ----------------------------------------------------------------------------- imports


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path) -> set[str]:
    """Every module a file imports at run time (function-level imports too; not
    ``if TYPE_CHECKING:`` blocks), with the packages whose ``__init__`` that runs."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # submodules, when they are modules
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found


def _library_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in LIBRARY.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        for target in _imports(path):
            if target in modules and target != name:
                edges.add(target)
            parts = target.split(".")
            for i in range(2, len(parts)):  # packages whose __init__ runs first, unless already running
                prefix = ".".join(parts[:i])
                if prefix in modules and prefix != name and prefix not in ancestors:
                    edges.add(prefix)
        graph[name] = edges
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_the_library_has_no_import_cycle():
    assert _find_cycle(_library_graph()) is None, " -> ".join(_find_cycle(_library_graph()))


def test_the_cycle_check_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_the_library_never_imports_its_processes():
    offenders = {
        _module_name(p): sorted(t for t in _imports(p) if t.split(".")[0] in ("producers", "consumers"))
        for p in LIBRARY.rglob("*.py")
    }
    assert {m: t for m, t in offenders.items() if t} == {}


def test_no_benchmark_imports_the_processes():
    offenders = {p.name: sorted(t for t in _imports(p) if t.split(".")[0] in ("producers", "consumers"))
                 for p in (ROOT / "bench").glob("*.py")}
    assert {m: t for m, t in offenders.items() if t} == {}


def test_reading_a_config_loads_no_diffusion_stack_and_no_open_clip():
    """Every trainer rank and ``producers.plan`` read the config: they must not pay for (or
    depend on) diffusers, transformers and open_clip to do so."""
    import subprocess
    import sys

    code = ("import sys, edsam_online.config, edsam_online.trainer, edsam_online.producer; "
            "print(sorted(m for m in ('diffusers', 'transformers', 'open_clip') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_library_functions_stay_short_and_the_producer_and_receiver_focused():
    """No library function runs over 60 lines; the producer loop and the receiver thread keep
    their helpers (sinks, sockets, the sequence tracker) in modules of their own."""
    long_functions = []
    sizes = {}
    for path in LIBRARY.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            size = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and size > 60:
                long_functions.append(f"{_module_name(path)}.{node.name} ({size} lines)")
            if isinstance(node, ast.ClassDef):
                sizes[f"{_module_name(path)}.{node.name}"] = size
    assert long_functions == []
    assert len((LIBRARY / "producer.py").read_text().splitlines()) <= 400
    assert sizes["edsam_online.streaming.Receiver"] <= 200


#: The library's layers, lowest first; a module may import its own layer and the ones below.
LAYERS = (
    ("edsam_online", "cli", "validation", "allocator", "security", "wire", "sequence", "wandb_offline", "policy", "feedback"),  # no torch model
    ("data", "runtime", "buffer", "buffer_snapshot", "metrics", "ledger"),  # data, devices and storage every component shares
    ("streaming", "sinks", "steering", "checkpoint", "optim", "losses", "models", "eval", "loader", "diffusion", "monitor",
     "report"),  # components
    ("methods", "producer", "trainer"),  # what a role runs
    ("config",),  # the root config composes every component's
    ("preflight",),  # checks the composed config of every role
)


def _layer(module: str) -> int:
    name = module.removeprefix("edsam_online.") if module != "edsam_online" else module
    for i, layer in enumerate(LAYERS):
        if name in layer or name.split(".")[0] in layer:
            return i
    raise AssertionError(f"{module} is in no layer of LAYERS")


def test_no_library_module_imports_one_above_it():
    graph = _library_graph()
    upward = sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets if _layer(t) > _layer(m))
    assert upward == []


def test_the_layer_check_finds_an_upward_import():
    assert _layer("edsam_online.wire") < _layer("edsam_online.streaming") < _layer("edsam_online.producer")
    assert _layer("edsam_online.diffusion.scoring") < _layer("edsam_online.producer")  # scoring -> producer is upward


def _doc_value(text: str):
    """A default as docs/configuration.md writes it: `null`, true/false, a number, 16 MiB, 2^20,
    a `string`, or a list; a trailing "(...)" explains and is not part of it."""
    text = re.sub(r"\s*\(.*\)\s*$", "", text.strip()).strip()
    if text.startswith("`") and text.endswith("`"):
        text = text[1:-1]
        if text in ("null", '""'):
            return None if text == "null" else ""
        # YAML flow style, as Hydra writes it (YAML 1.1 reads 1e-4 as a string: floats are re-read)
        return _floats(yaml.safe_load(text)) if text[:1] in "[{" else text
    units = {"KiB": 2**10, "MiB": 2**20}
    if (m := re.fullmatch(r"(\d+) (KiB|MiB)", text)):
        return int(m.group(1)) * units[m.group(2)]
    if (m := re.fullmatch(r"(\d+)\^(\d+)", text)):
        return int(m.group(1)) ** int(m.group(2))
    if text in ("true", "false"):
        return text == "true"
    try:
        return float(text)
    except ValueError:
        return text


def _floats(value):
    if isinstance(value, list):
        return [_floats(v) for v in value]
    if isinstance(value, dict):
        return {k: _floats(v) for k, v in value.items()}
    try:
        return float(value) if isinstance(value, str) and re.fullmatch(r"[-+]?[\d.]+e[-+]?\d+", value) else value
    except ValueError:
        return value


def _documented_defaults() -> dict[str, list[tuple[str, str]]]:
    """Per ``## group`` of docs/configuration.md: (key, default as written) of its table rows."""
    out: dict[str, list[tuple[str, str]]] = {}
    group = None
    for line in (ROOT / "docs" / "configuration.md").read_text().splitlines():
        if line.startswith("## "):
            group = line[3:].strip()
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("| `") else []
        if group is None or len(cells) < 2:
            continue
        keys = [k.strip().strip("`") for k in cells[0].split(" / ")]
        values = [v.strip() for v in cells[1].split(" / ")] if len(keys) > 1 else [cells[1]]
        prefix = ""
        for key, value in zip(keys, values if len(values) == len(keys) else [cells[1]] * len(keys)):
            if key.startswith("."):
                key = prefix + key
            prefix = key.rpartition(".")[0]
            out.setdefault(group, []).append((key, value))
    return out


def _default_at(cls, dotted: str):
    node = cls()
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def test_the_configuration_reference_lists_every_key_with_its_dataclass_default():
    """docs/configuration.md restates each component's defaults for readers; this keeps it true:
    every key of every component is in its table, with the dataclass's default."""
    documented = _documented_defaults()
    types = {f.name: f.type for f in dataclasses.fields(Config)}
    wrong, missing = [], []
    for group in [f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(types[f.name])
                  or isinstance(types[f.name], str) and f.name not in ("seed", "run_dir")]:
        cls = type(getattr(Config(), group))
        rows = dict(documented.get(group, []))
        leaves = []
        for f in dataclasses.fields(cls):
            value = getattr(cls(), f.name)
            if dataclasses.is_dataclass(value):
                leaves += [f"{f.name}.{g.name}" for g in dataclasses.fields(value)]
            else:
                leaves.append(f.name)
        for key in leaves:
            if key not in rows:
                missing.append(f"{group}.{key}")
                continue
            expected, written = _default_at(cls, key), _doc_value(rows[key])
            if isinstance(expected, bool) or expected is None or isinstance(expected, (str, list, dict)):
                ok = written == expected
            else:
                ok = isinstance(written, (int, float)) and math.isclose(written, float(expected))
            if not ok:
                wrong.append(f"{group}.{key}: documented {rows[key]!r}, default {expected!r}")
    assert missing == [] and wrong == [], (missing, wrong)


def test_the_reference_check_reads_every_way_a_default_is_written():
    assert _doc_value("`null` (= `$EDSAM_CACHE`)") is None and _doc_value('`""`') == ""
    assert _doc_value("16 MiB") == 16 * 2**20 and _doc_value("2^20") == 2**20 and _doc_value("1 (off)") == 1.0
    assert _doc_value("`[1e-4, 0.5]`") == [1e-4, 0.5] and _doc_value("`{a: [b]}`") == {"a": ["b"]}
    assert _doc_value("`leading`") == "leading" and _doc_value("false") is False
