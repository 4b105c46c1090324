"""Text corpora by name, for evaluation and for calibration.

A corpus is a folder of text files under one of the data roots: the copies shipped in
`lowbit/data`, folders named in $LOWBIT_DATA_DIR (colon-separated), and a `shared/data` folder
beside the working directory or one of its parents. Names are matched loosely
("wikitext-2-raw" == "wikitext2raw"), so a corpus added to shared/data is usable by its folder
name without code changes. Each corpus has two roles that never overlap:
  eval  - the file named *test*, else *valid*, else the last 10% of a single file's lines
  calib - the file named *valid*/*val*, else *train*, else the first 90% of a single file's lines
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from lowbit.errors import LowbitError

_PACKAGE_DATA = Path(__file__).resolve().parent.parent / "data"
TEXT_SUFFIXES = (".txt", ".raw", ".jsonl", ".json", ".tokens")

# Names the papers use, mapped to the folder that holds each role's file.
ALIASES = {
    "wikitext2": {"eval": "wikitext-2-raw", "calib": "wikitext-2-tokenized"},
    "wikitext2raw": {"eval": "wikitext-2-raw", "calib": "wikitext-2-tokenized"},
    "pileval": {"eval": "pile", "calib": "pile"},
}
HOLDOUT_FRACTION = 0.1  # single-file corpora: the last 10% of lines is held out for evaluation


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def data_roots() -> list[Path]:
    roots = [Path(p) for p in os.environ.get("LOWBIT_DATA_DIR", "").split(os.pathsep) if p]
    here = Path.cwd().resolve()
    for d in (here, *here.parents):
        for cand in (d / "shared" / "data", d.parent / "shared" / "data"):
            if cand.is_dir() and cand not in roots:
                roots.append(cand)
    roots.append(_PACKAGE_DATA)
    return [r for r in roots if r.is_dir()]


def corpora() -> dict[str, Path]:
    """Every corpus folder found, by normalized name (earlier roots win)."""
    found: dict[str, Path] = {}
    for root in data_roots():
        for d in sorted(root.iterdir()):
            if d.is_dir() and _text_files(d):
                found.setdefault(_norm(d.name), d)
    return found


def available_names() -> list[str]:
    names = set(ALIASES) | {p.name for p in corpora().values()}
    return sorted(n for n in names if n not in ALIASES or _alias_present(n))


def _alias_present(alias: str) -> bool:
    have = corpora()
    return all(_norm(folder) in have for folder in ALIASES[alias].values())


def _text_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix in TEXT_SUFFIXES)


@dataclass
class Split:
    corpus: str
    role: str
    path: Path
    part: str  # "all", "head" (first 90% of lines) or "tail" (last 10%)

    def describe(self) -> str:
        part = {"all": "", "head": " (first 90% of lines)", "tail": " (last 10% of lines)"}[self.part]
        return f"{self.path}{part}"


def resolve(name: str, role: str) -> Split:
    if role not in ("eval", "calib"):
        raise ValueError(role)
    have = corpora()
    key = _norm(name)
    folder = ALIASES.get(key, {}).get(role)
    d = have.get(_norm(folder)) if folder else have.get(key)
    if d is None:
        raise LowbitError(f"dataset {name!r} not found; available: {', '.join(available_names())} "
                          f"(searched {', '.join(str(r) for r in data_roots())})")
    files = _text_files(d)
    pick = _pick(files, role)
    if pick is not None:
        return Split(name, role, pick, "all")
    if len(files) == 1:
        return Split(name, role, files[0], "tail" if role == "eval" else "head")
    raise LowbitError(f"dataset {name!r} ({d}): cannot tell which file is for {role}; "
                      f"name one *test* (evaluation) and one *valid* or *train* (calibration)")


def _pick(files: list[Path], role: str) -> Path | None:
    order = ("test", "valid") if role == "eval" else ("valid", "val", "train")
    for word in order:
        for f in files:
            stem = f.stem.lower()
            if re.search(rf"(^|[^a-z]){word}([^a-z]|$)", stem) or stem.startswith(word):
                if role == "calib" and "test" in stem:
                    continue
                return f
    return None


def load_text(name: str, role: str = "eval") -> str:
    """The corpus text for a role. Files without any blank line (WikiText-2 raw as shipped, one
    paragraph a line) are joined with "\\n\\n", the convention of the GPTQ/AWQ evaluation code."""
    split = resolve(name, role)
    lines = _read_lines(split.path)
    if split.part != "all":
        cut = int(len(lines) * (1 - HOLDOUT_FRACTION))
        lines = lines[:cut] if split.part == "head" else lines[cut:]
    if not lines:
        raise LowbitError(f"dataset {name!r}: {split.describe()} holds no text")
    if all(line.strip() for line in lines):
        return "\n\n".join(lines)
    return "\n".join(lines)


def _read_lines(path: Path) -> list[str]:
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LowbitError(f"{path}: not UTF-8 text ({e})") from None
    if path.suffix in (".jsonl", ".json"):
        out = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise LowbitError(f"{path}:{i}: expected one JSON object with a 'text' field a line") from None
        return out
    return raw.splitlines()
