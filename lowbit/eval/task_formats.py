"""Prompt formats of the multiple-choice tasks, written to match lm-evaluation-harness (v0.4) so
scores compare with published ones. One function a task: row -> Item(context, choices, gold).
Each choice is scored as the continuation target_delimiter + choice (" " everywhere), and
acc_norm divides by len(choice) as the harness's ConfigurableTask.process_results does.

Followed (by reading, not copied): lm_eval/tasks/hellaswag/hellaswag.yaml and utils.py,
lm_eval/tasks/arc/arc_easy.yaml (arc_challenge includes it), lm_eval/tasks/piqa/piqa.yaml,
lm_eval/tasks/super_glue/boolq/default.yaml, lm_eval/tasks/mmlu/default/_default_template_yaml
(description, first_n few-shot sampler over the dev split, "\\n\\n" between examples).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from lowbit.errors import LowbitError

TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
MMLU_LETTERS = ["A", "B", "C", "D"]
DEFAULT_FEWSHOT = {"hellaswag": 0, "arc_challenge": 0, "piqa": 0, "boolq": 0, "mmlu": 5}


@dataclass
class Item:
    context: str
    choices: list[str]  # without the delimiter; the scored continuation is " " + choice
    gold: int
    group: str = ""  # mmlu: the subject


def _hellaswag_preprocess(text: str) -> str:
    # the harness's hellaswag utils.preprocess: WikiHow markers out, brackets out, double spaces in
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _split_ctx(ctx: str) -> tuple[str, str]:
    """The shipped `ctx` is ctx_a + " " + ctx_b with the split lost; ctx_b is the unfinished
    sentence that the endings complete (ActivityNet) or empty (most WikiHow items, whose ctx ends
    a sentence). Recovered as the text after the last sentence end, so ctx_b.capitalize() can be
    applied as the harness does."""
    if not ctx or ctx.rstrip()[-1] in ".!?\"'":
        return ctx, ""
    m = re.match(r"^(.*[.!?])\s+(\S.*)$", ctx, re.S)
    return (m.group(1), m.group(2)) if m else ("", ctx)


def hellaswag(row: dict) -> Item:
    ctx_a, ctx_b = _split_ctx(row["ctx"])
    ctx = (ctx_a + " " + ctx_b.capitalize()) if ctx_a else ctx_b.capitalize()
    return Item(_hellaswag_preprocess(row["activity_label"] + ": " + ctx),
                [_hellaswag_preprocess(e) for e in row["endings"]], int(row["label"]))


def arc(row: dict) -> Item:
    labels = row["choices"]["label"]
    if row["answerKey"] not in labels:
        raise LowbitError(f"arc row {row.get('id')}: answerKey {row['answerKey']!r} not among labels {labels}")
    return Item(f"Question: {row['question']}\nAnswer:", list(row["choices"]["text"]), labels.index(row["answerKey"]))


def piqa(row: dict) -> Item:
    return Item(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"]))


def boolq(row: dict) -> Item:
    label = row["label"]
    if isinstance(label, str):  # the shipped copy stores "true"/"false"
        label = {"true": 1, "false": 0}[label.strip().lower()]
    return Item(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ["no", "yes"], int(label))


def _mmlu_question(row: dict) -> str:
    opts = "".join(f"\n{letter}. {c}" for letter, c in zip(MMLU_LETTERS, row["choices"]))
    return f"{row['question'].strip()}{opts}\nAnswer:"


def mmlu(row: dict, dev_by_subject: dict[str, list[dict]], num_fewshot: int) -> Item:
    subject = row["subject"]
    dev = dev_by_subject.get(subject, [])
    if num_fewshot > len(dev):
        raise LowbitError(f"mmlu {subject}: --num-fewshot {num_fewshot} but its dev split holds {len(dev)} questions")
    context = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    for ex in dev[:num_fewshot]:  # the harness's first_n sampler: the first K dev questions, in order
        context += _mmlu_question(ex) + TARGET_DELIMITER + MMLU_LETTERS[ex["answer"]] + FEWSHOT_DELIMITER
    return Item(context + _mmlu_question(row), list(MMLU_LETTERS), row["answer"], subject)


def build_items(task: str, rows: list[dict], fewshot, num_fewshot: int | None) -> list[Item]:
    k = DEFAULT_FEWSHOT[task] if num_fewshot is None else num_fewshot
    if task == "mmlu":
        return [mmlu(r, fewshot, k) for r in rows]
    if k:
        raise LowbitError(f"{task}: --num-fewshot {k} needs the task's training split, which is not shipped "
                          f"in shared/data; run it 0-shot (the harness's default for {task})")
    fn = {"hellaswag": hellaswag, "arc_challenge": arc, "piqa": piqa, "boolq": boolq}[task]
    return [fn(r) for r in rows]


def interleave_subjects(rows: list[dict]) -> list[dict]:
    """MMLU rows in round-robin order over subjects (first question of each subject, then the
    second, ...), so that --limit N covers every subject instead of the first few."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["subject"], []).append(r)
    out, i = [], 0
    while len(out) < len(rows):
        out += [qs[i] for _, qs in sorted(by.items()) if i < len(qs)]
        i += 1
    return out
