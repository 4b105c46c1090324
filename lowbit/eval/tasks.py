"""`lowbit eval tasks`: multiple-choice accuracy by log-likelihood, scored as lm-evaluation-harness
scores it. Each item's choices are continuations of its context (task_formats.py); the predicted
choice is the argmax of the summed log-likelihood (acc) or of log-likelihood / len(choice)
(acc_norm, the harness's "byte-length" normalization, which its code takes as the string's
length). Standard errors are the harness's: sample standard deviation / sqrt(n).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

from lowbit.errors import LowbitError

TASKS = ("hellaswag", "arc_challenge", "piqa", "boolq", "mmlu", "gsm8k")  # gsm8k: generative (gsm8k.py)


@dataclass
class TaskResult:
    task: str
    num_fewshot: int
    n: int
    total: int  # items the split holds; n < total under --limit
    acc: float
    acc_stderr: float
    acc_norm: float
    acc_norm_stderr: float
    seconds: float
    files: dict[str, str] = field(default_factory=dict)  # data file -> sha256
    groups: dict[str, dict] = field(default_factory=dict)  # mmlu: per subject {n, acc}
    samples: list[dict] = field(default_factory=list)  # gsm8k: per question what was generated and extracted
    kv_bits: int = 16  # the KV cache the model attended (generated) through

    def to_dict(self) -> dict:
        return asdict(self)


GENERATIVE_BATCH = 16  # gsm8k: at least this many questions per engine batch (generation, not scoring)


def run_task(triple, task: str, limit: int | None = None, num_fewshot: int | None = None, batch_size: int = 4,
             show_progress: bool = True, kv_bits: int = 16) -> "TaskResult":
    """Any task of TASKS on a loaded (model, tokenizer, checkpoint): gsm8k by generation through the
    engine (lowbit/eval/gsm8k.py), the others by log-likelihood (`evaluate_task`); kv_bits 8 / 4:
    through a quantized KV cache."""
    if task == "gsm8k":
        from lowbit.eval.gsm8k import evaluate_gsm8k

        return evaluate_gsm8k(triple, limit, num_fewshot, max(batch_size, GENERATIVE_BATCH),
                              show_progress=show_progress, kv_bits=kv_bits)
    return evaluate_task(triple[0], triple[1], task, limit, num_fewshot, batch_size, show_progress, kv_bits)


def mean_stderr(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return mean, float("nan")
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)
    return mean, math.sqrt(var / n)


def parse_tasks(spec: str) -> list[str]:
    names = [t.strip() for t in spec.split(",") if t.strip()]
    for t in names:
        if t not in TASKS:
            raise LowbitError(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
    if not names:
        raise LowbitError(f"--tasks is empty; choose from {', '.join(TASKS)}")
    return names


def score_items(model, tokenizer, items, batch_size: int = 4, max_length: int | None = None,
                prefix_id: int | None = None, progress=None, kv_bits: int = 16) -> list[list[float]]:
    """Per item, the log-likelihood of each choice (" " + choice after the context)."""
    from lowbit.eval.loglik import encode_pair, loglikelihoods
    from lowbit.eval.task_formats import TARGET_DELIMITER

    requests, spans = [], []
    for it in items:
        spans.append((len(requests), len(it.choices)))
        requests += [encode_pair(tokenizer, it.context, TARGET_DELIMITER + c, prefix_id) for c in it.choices]
    lls = loglikelihoods(model, requests, batch_size, max_length, progress=progress, kv_bits=kv_bits)
    return [lls[s:s + k] for s, k in spans]


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: xs[i])  # first of equal maxima, as numpy.argmax


def evaluate_task(model, tokenizer, task: str, limit: int | None = None, num_fewshot: int | None = None,
                  batch_size: int = 4, show_progress: bool = True, kv_bits: int = 16) -> TaskResult:
    from lowbit.eval.task_data import load_task
    from lowbit.eval.task_formats import DEFAULT_FEWSHOT, build_items, interleave_subjects

    data = load_task(task)
    rows = interleave_subjects(data.rows) if task == "mmlu" else data.rows
    if limit is not None:
        rows = rows[:limit]
    items = build_items(task, rows, data.fewshot, num_fewshot)
    cfg = getattr(model, "config", None)
    max_length = getattr(cfg, "max_position_embeddings", None) or 2048
    prefix_id = getattr(cfg, "bos_token_id", None)
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(it.choices) for it in items), desc=f"{task}", unit="req", leave=False)
    t0 = time.time()
    try:
        lls = score_items(model, tokenizer, items, batch_size, max_length, prefix_id, bar.update if bar else None,
                          kv_bits)
    finally:
        if bar is not None:
            bar.close()
    acc = [float(_argmax(ll) == it.gold) for ll, it in zip(lls, items)]
    acc_norm = [float(_argmax([x / len(c) for x, c in zip(ll, it.choices)]) == it.gold) for ll, it in zip(lls, items)]
    groups: dict[str, dict] = {}
    for a, it in zip(acc, items):
        if it.group:
            g = groups.setdefault(it.group, {"n": 0, "acc": 0.0})
            g["n"] += 1
            g["acc"] += a
    for g in groups.values():
        g["acc"] /= g["n"]
    a, a_se = mean_stderr(acc)
    an, an_se = mean_stderr(acc_norm)
    k = DEFAULT_FEWSHOT[task] if num_fewshot is None else num_fewshot
    return TaskResult(task, k, len(items), len(data.rows), a, a_se, an, an_se, time.time() - t0, data.files,
                      dict(sorted(groups.items())), kv_bits=kv_bits)
