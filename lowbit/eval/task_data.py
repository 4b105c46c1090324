"""The shipped multiple-choice and GSM8K datasets, read as plain rows (dicts) from the data roots
that lowbit.eval.datasets searches (shared/data, $LOWBIT_DATA_DIR, lowbit/data). Nothing here
formats prompts (task_formats.py) or scores (tasks.py); nothing is fetched from a hub.

Each task names its folder and files as shipped in shared/data (see its README for provenance).
"""
from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from lowbit.errors import LowbitError

# task -> (folder, evaluation files relative to it); files are read in this order
EVAL_FILES = {
    "hellaswag": ("hellaswag", ["val.jsonl"]),
    "arc_challenge": ("arc-challenge", ["test.jsonl"]),
    "piqa": ("piqa", ["dev.jsonl", "dev-labels.lst"]),
    "boolq": ("boolq", ["val.jsonl"]),
    "mmlu": ("mmlu", ["test"]),
    "gsm8k": ("gsm8k", ["test.jsonl"]),
}
FEWSHOT_FILES = {"mmlu": "dev", "gsm8k": "train.jsonl"}


@dataclass
class TaskRows:
    task: str
    folder: Path
    rows: list[dict]  # evaluation split
    fewshot: list[dict] | dict[str, list[dict]] | None  # mmlu: dev rows by subject
    files: dict[str, str] = field(default_factory=dict)  # path -> sha256 of every file read


def task_folder(task: str) -> Path:
    from lowbit.eval.datasets import data_roots

    if task not in EVAL_FILES:
        raise LowbitError(f"unknown task {task!r}; available: {', '.join(EVAL_FILES)}")
    name = EVAL_FILES[task][0]
    for root in data_roots():
        if (root / name).is_dir():
            return root / name
    raise LowbitError(f"task {task!r}: folder {name!r} not found in {', '.join(str(r) for r in data_roots())}; "
                      f"copy it from shared/data or set LOWBIT_DATA_DIR")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _jsonl(path: Path) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise LowbitError(f"{path}:{i}: not a JSON object ({e})") from None
    return out


def _mmlu_dir(d: Path, suffix: str) -> dict[str, list[dict]]:
    """MMLU csv files `<subject>_<suffix>.csv` (header question,choice0..3,answer) -> rows by subject."""
    files = sorted(d.glob(f"*_{suffix}.csv"))
    if not files:
        raise LowbitError(f"{d}: no *_{suffix}.csv files")
    out = {}
    for p in files:
        subject = p.name[: -len(f"_{suffix}.csv")]
        with open(p, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        try:
            out[subject] = [{"subject": subject, "question": r["question"],
                             "choices": [r[f"choice{i}"] for i in range(4)], "answer": int(r["answer"])} for r in rows]
        except (KeyError, ValueError) as e:
            raise LowbitError(f"{p}: expected columns question,choice0..choice3,answer (0-3): {e}") from None
    return out


def load_task(task: str) -> TaskRows:
    folder = task_folder(task)
    names = EVAL_FILES[task][1]
    paths = [folder / n for n in names]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise LowbitError(f"task {task!r}: missing {', '.join(missing)}")
    files: dict[str, str] = {}
    fewshot = None
    if task == "mmlu":
        by_subject = _mmlu_dir(paths[0], "test")
        rows = [r for subject in sorted(by_subject) for r in by_subject[subject]]
        fewshot = _mmlu_dir(folder / FEWSHOT_FILES["mmlu"], "dev")
        for p in sorted(paths[0].glob("*_test.csv")) + sorted((folder / "dev").glob("*_dev.csv")):
            files[str(p)] = sha256_file(p)
        return TaskRows(task, folder, rows, fewshot, files)
    rows = _jsonl(paths[0])
    if task == "piqa":
        labels = paths[1].read_text().split()
        if len(labels) != len(rows):
            raise LowbitError(f"{paths[1]}: {len(labels)} labels for {len(rows)} rows in {paths[0]}")
        for r, lab in zip(rows, labels):
            r["label"] = int(lab)
    if task in FEWSHOT_FILES:
        p = folder / FEWSHOT_FILES[task]
        fewshot = _jsonl(p)
        paths.append(p)
    for p in paths:
        files[str(p)] = sha256_file(p)
    return TaskRows(task, folder, rows, fewshot, files)
