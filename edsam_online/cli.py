"""What every Hydra entry point does with its command line before Hydra sees it.

Two things Hydra does not do for us:

* **Shell brace patterns.** ``data.path='/data/cc3m/{00000..00331}.tar'`` is webdataset's
  shard syntax, but Hydra's override grammar reads ``{`` as the start of a dict and stops
  with ``mismatched input '{'``; it parses only with a second layer of quotes.
  :func:`quote_brace_patterns` adds that layer to values holding a ``{a..b}`` or
  ``{a,b}`` pattern, so the commands in the docs run as written.
* **A fast, described ``--help``.** Hydra's ``--help`` composes the whole tree after the
  entry point imported torch (seconds) and prints YAML without a word on what a key means.
  :func:`help_text` reads the component dataclasses' docstrings, fields and defaults from
  their source with :mod:`ast`, so the docstrings stay the one source and answering
  ``--help`` imports nothing heavy. ``--hydra-help`` and ``--cfg job`` still reach Hydra.

This module must stay light: it imports only the standard library.
"""

from __future__ import annotations

import ast
import re
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
_PACKAGE = Path(__file__).resolve().parent

# key=value (also +key / ++key): a value with a {a..b} or {a,b} shell pattern and no ':'
# (a Hydra dict or an ${interpolation:...} holds one).
_OVERRIDE = re.compile(r"^(\+{0,2}[A-Za-z_~][\w.\-/@]*)=(.*)$", re.S)
_BRACE = re.compile(r"(?<!\$)\{[^{}:]*(\.\.|,)[^{}:]*\}")


def quote_brace_patterns(argv: list[str]) -> list[str]:
    """``argv`` with every override value that holds a shell brace pattern single-quoted
    for Hydra's grammar; quoted values, dicts, interpolations and options pass unchanged."""
    out = []
    for arg in argv:
        match = _OVERRIDE.match(arg)
        if match:
            key, value = match.groups()
            if value and value[0] not in "'\"" and _BRACE.search(value):
                escaped = value.replace("\\", "\\\\").replace("'", "\\'")
                arg = f"{key}='{escaped}'"
        out.append(arg)
    return out


def _docstring_summary(doc: str | None) -> str:
    """A docstring's text without reST markup, as one wrapped paragraph per paragraph."""
    if not doc:
        return ""
    doc = re.sub(r":(?:class|func|meth|data|attr|mod):`~?([^`]+)`", r"\1", textwrap.dedent(doc).strip())
    doc = doc.replace("``", "")
    return "\n".join(textwrap.fill(" ".join(p.split()), 96, initial_indent="    ", subsequent_indent="    ")
                     for p in doc.split("\n\n") if p.strip())


def _module_path(module: str) -> Path:
    path = ROOT / Path(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _imports(tree: ast.Module, module: str) -> dict[str, str]:
    """name -> the module it is imported from, for ``from X import name`` lines of ``module``
    (relative imports resolved)."""
    package = module if _module_path(module).name == "__init__.py" else module.rpartition(".")[0]
    out = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            source = ".".join(p for p in (base, node.module) if p)
            out.update({alias.asname or alias.name: source for alias in node.names})
    return out


def _find_class(module: str, name: str) -> ast.ClassDef | None:
    """The class ``name`` of ``module``'s source, following one re-export (``data/__init__``)."""
    path = _module_path(module)
    if not path.is_file():
        return None
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    source = _imports(tree, module).get(name)
    return _find_class(source, name) if source and source != module else None


def _field_default(node: ast.AnnAssign) -> str:
    value = node.value
    if value is None:
        return "(required)"
    if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "field":
        for kw in value.keywords:
            if kw.arg == "default":
                return ast.unparse(kw.value)
            if kw.arg == "default_factory":
                factory = kw.value
                if isinstance(factory, ast.Lambda):
                    return ast.unparse(factory.body)
                return f"{ast.unparse(factory)}()"
    return ast.unparse(value)


def _fields(cls: ast.ClassDef) -> list[tuple[str, str, str]]:
    """(name, type, default) of a dataclass's fields, in order."""
    return [(n.target.id, ast.unparse(n.annotation), _field_default(n)) for n in cls.body
            if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
            and not ast.unparse(n.annotation).startswith("ClassVar")]


#: The root dataclass of the trainer's, the producers' and ``edsam-prepare``'s config tree.
TRAINING_ROOT = ("edsam_online.config", "Config")


def root_components(root: tuple[str, str] = TRAINING_ROOT) -> list[tuple[str, str, str]]:
    """(root key, dataclass name, module) of every dataclass field of the root dataclass."""
    module, name = root
    imports = _imports(ast.parse(_module_path(module).read_text(encoding="utf-8")), module)
    return [(key, annotation, imports[annotation]) for key, annotation, _ in _fields(_find_class(module, name))
            if annotation in imports]


def group_options(only: tuple[str, ...] | None = None) -> dict[str, list[str]]:
    """Config group -> its options (the YAML files under ``configs/<group>/``)."""
    return {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in sorted(CONFIG_DIR.iterdir())
            if d.is_dir() and (only is None or d.name in only)}


def help_text(program: str, usage: str, root: tuple[str, str] = TRAINING_ROOT,
              groups: tuple[str, ...] | None = None) -> str:
    """The ``--help`` of a Hydra entry point: usage, its groups (``groups``; None: all) and every
    component's keys with defaults and its dataclass docstring."""
    lines = [f"usage: {program} [KEY=VALUE ...] [GROUP=OPTION ...]", "", textwrap.dedent(usage).strip(), "",
             "Groups (GROUP=OPTION picks a file under configs/GROUP/):"]
    lines += [f"  {group:<11} {', '.join(options)}" for group, options in group_options(groups).items()]
    lines += ["", "Keys (KEY=VALUE; defaults below, a group option or experiment may change them):"]
    components = root_components(root)
    for key, cls_name, module in components:
        cls = _find_class(module, cls_name)
        if cls is None:
            continue
        lines.append(f"\n{key}  ({cls_name})")
        summary = _docstring_summary(ast.get_docstring(cls))
        if summary:
            lines.append(summary)
        for name, annotation, default in _fields(cls):
            nested = _find_class(module, annotation) if default == f"{annotation}()" else None
            if nested is None:
                lines.append(f"  {key}.{name}: {annotation} = {default}")
            else:
                lines += [f"  {key}.{name}.{n}: {a} = {d}" for n, a, d in _fields(nested)]
    lines.append("\nTop level")
    lines += [f"  {name}: {annotation} = {default}" for name, annotation, default in _fields(_find_class(*root))
              if name not in {k for k, _, _ in components}]
    lines += ["", "Hydra's own options: --hydra-help; print the composed config without running: --cfg job.",
              "Every key in detail: docs/configuration.md."]
    return "\n".join(lines)


def prepare_argv(program: str, usage: str, root: tuple[str, str] = TRAINING_ROOT,
                 groups: tuple[str, ...] | None = None) -> None:
    """Answer ``-h``/``--help`` (then exit 0) and quote brace patterns in ``sys.argv``, before
    the entry point imports anything heavy or Hydra parses the overrides."""
    args = sys.argv[1:]
    if "-h" in args or "--help" in args:
        print(help_text(program, usage, root, groups))
        raise SystemExit(0)
    sys.argv[1:] = quote_brace_patterns(args)
