"""Dependencies point one way (STYLE.md, "The layout"): every `lowbit` import in lowbit/**/*.py,
at any depth (function-local ones too) and `importlib.import_module("lowbit...")` calls, must be
an arrow this table allows. A failure names the file, the line and the forbidden arrow."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import lowbit

ROOT = Path(lowbit.__file__).parent

# Imported from anywhere; they import only each other.
BASE = {"errors", "config", "atomic_dir"}

_BELOW_MODELS = {"layers", "kernels", "formats", "parallel"}
_MODEL_ROOMS = {"loading", "models"} | _BELOW_MODELS
# room -> the rooms it may import (besides itself and BASE). The chain
# cli -> serve/eval/bench -> engine -> models -> layers -> kernels, with:
#   formats  the checkpoint bit layouts (pure tensor packing): anything from kernels up may use them
#   parallel the tensor-parallel group and its collectives (torch.distributed only): layers up
#   loading  builds models from checkpoints, so it sits beside models: engine, quant and the
#            commands use it; models and layers never do
#   quant    uses loading, models and layers, never engine
#   convert  the `lowbit convert` command: at the commands' tier
#   __init__ the public API (lazy re-exports of every room), like cli
ALLOWED: dict[str, set[str]] = {
    "formats": set(),
    "parallel": set(),
    "kernels": {"formats"},
    "layers": {"kernels", "formats", "parallel"},
    "models": set(_BELOW_MODELS),
    "loading": {"models"} | _BELOW_MODELS,
    "quant": set(_MODEL_ROOMS),
    "engine": set(_MODEL_ROOMS),
    "eval": {"engine"} | _MODEL_ROOMS,
    "bench": {"engine", "eval"} | _MODEL_ROOMS,
    "serve": {"engine", "eval", "bench"} | _MODEL_ROOMS,
    "convert": set(_MODEL_ROOMS),
}
ANYTHING = {"cli", "__init__"}
# Single modules allowed against their room's direction, each with its reason.
EXCEPTIONS: dict[tuple[str, str], str] = {
    # finds corpora by name in data folders (imports only errors): calibration reads the same text
    # that evaluation does
    ("quant", "lowbit.eval.datasets"): "shared corpus lookup",
}


def room_of(module: str) -> str:
    """'lowbit.layers.linear' -> 'layers'; 'lowbit' (the package itself) -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _package_of(path: Path) -> str:
    name = module_name(path)
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _is_import_call(node: ast.Call) -> bool:
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
    return name in ("import_module", "__import__")


def _literal_prefix(node: ast.expr) -> str | None:
    """A string literal, or the literal start of an f-string ('lowbit.kernels.' of f'lowbit.kernels.{m}')."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return node.values[0].value
    return None


def _submodule(package: str, name: str) -> str:
    where = ROOT.parent.joinpath(*package.split("."), name)
    return f"{package}.{name}" if where.is_dir() or where.with_suffix(".py").is_file() else package


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every lowbit import in the file, at any depth."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this file's package
                pkg = _package_of(path).split(".")
                pkg = pkg[:len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            # `from lowbit.x import y`: the module lowbit.x.y where y is one, else lowbit.x
            # (so `from lowbit import LLM` is the package's API, `from lowbit import errors` the module)
            found += [(node.lineno, _submodule(base, a.name)) for a in node.names]
        elif isinstance(node, ast.Call) and _is_import_call(node) and node.args:
            target = _literal_prefix(node.args[0])
            if target is not None:
                found.append((node.lineno, target.rstrip(".")))
    return sorted({(line, m) for line, m in found if m == "lowbit" or m.startswith("lowbit.")})


def violations(path: Path) -> list[str]:
    here = room_of(module_name(path))
    if here in ANYTHING:
        return []
    allowed = set() if here in BASE else ALLOWED.get(here)
    rel = path.relative_to(ROOT.parent)
    if allowed is None:
        return [f"{rel}: room {here!r} is not in tests/test_layering.py's table; add it with its arrows"]
    bad = []
    for line, target in imports_of(path):
        there = room_of(target)
        if there == here or there in BASE or there in allowed:
            continue
        if (here, target) in EXCEPTIONS:
            continue
        what = "the public API package" if there == "__init__" else there
        bad.append(f"{rel}:{line}: {here} -> {what} ({target})")
    return bad


def test_every_room_is_in_the_table():
    rooms = {room_of(module_name(p)) for p in ROOT.rglob("*.py")}
    assert rooms <= set(ALLOWED) | BASE | ANYTHING, rooms - set(ALLOWED) - BASE - ANYTHING


def test_dependencies_point_one_way():
    bad = [v for p in sorted(ROOT.rglob("*.py")) for v in violations(p)]
    assert not bad, "imports against the layering (STYLE.md):\n" + "\n".join(bad)


def test_the_checker_sees_every_kind_of_import(tmp_path, monkeypatch):
    """The checker itself: a file in layers/ with each kind of upward import is caught, line by line."""
    fake = tmp_path / "lowbit"
    (fake / "layers").mkdir(parents=True)
    src = ("import lowbit.engine.llm\n"
           "from lowbit.loading import awq_format\n"
           "def f():\n"
           "    from ..models import llama\n"
           "    import importlib\n"
           "    importlib.import_module('lowbit.quant.api')\n"
           "    return importlib.import_module(f'lowbit.serve.{f}')\n"
           "from lowbit import LLM\n"
           "from lowbit.kernels import w4a16\n"
           "from lowbit.errors import LowbitError\n")
    (fake / "layers" / "x.py").write_text(src)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake)
    got = violations(fake / "layers" / "x.py")
    assert [g.split(": ", 1)[1] for g in got] == [
        "layers -> engine (lowbit.engine.llm)", "layers -> loading (lowbit.loading)",
        "layers -> models (lowbit.models)", "layers -> quant (lowbit.quant.api)",
        "layers -> serve (lowbit.serve)", "layers -> the public API package (lowbit)"], got
    assert got[0].startswith("lowbit/layers/x.py:1:")
