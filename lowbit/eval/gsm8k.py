"""GSM8K (Cobbe et al. 2021), generative: k-shot chain of thought, exact match on the final number,
as lm-evaluation-harness's `gsm8k` task scores it.

Prompt: the k exemplars "Question: {question}\\nAnswer: {worked solution ending in #### N}" joined
by a blank line, then "Question: {question}\\nAnswer:". The exemplars are the first k rows of the
train split (the harness samples them at random with a fixed seed: the numbers compare in level,
not digit for digit). Greedy decoding through the engine (every question one request, batched by
its scheduler), at most 256 new tokens, cut at "Question:" (the next exemplar the model starts).
Two scores, the harness's two filters: `strict` takes the number after "#### " (the format the
exemplars teach), `flexible` the last number in the answer. Both compare after dropping commas,
"$" and a final "." from prediction and target alike.
"""
from __future__ import annotations

import re
import time

from lowbit.errors import LowbitError
from lowbit.eval.tasks import TaskResult, mean_stderr

DEFAULT_FEWSHOT = 8
MAX_NEW_TOKENS = 256
STOP = ["Question:", "</s>", "<|im_end|>"]
INVALID = "[invalid]"
_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_IGNORE = (re.compile(","), re.compile(r"\$"), re.compile(r"(?s).*#### "), re.compile(r"\.$"))


def format_question(question: str, answer: str | None = None) -> str:
    return f"Question: {question}\nAnswer:" + (f" {answer}" if answer is not None else "")


def build_prompt(question: str, shots: list[dict]) -> str:
    return "\n\n".join([format_question(s["question"], s["answer"]) for s in shots] + [format_question(question)])


def strict_answer(text: str) -> str:
    m = _STRICT.search(text)
    return m.group(1) if m else INVALID


def flexible_answer(text: str) -> str:
    found = _FLEXIBLE.findall(text)
    if not found:
        return INVALID
    a, b = found[-1]
    return a or b


def normalize(s: str) -> str:
    for pat in _IGNORE:
        s = pat.sub("", s)
    return s.strip().lower()


def is_correct(prediction: str, answer: str) -> bool:
    return prediction != INVALID and normalize(prediction) == normalize(answer)


def evaluate_gsm8k(triple, limit: int | None = None, num_fewshot: int | None = None, batch_size: int = 16,
                   max_new_tokens: int = MAX_NEW_TOKENS, show_progress: bool = True, kv_bits: int = 16) -> TaskResult:
    """triple: (model, tokenizer, checkpoint) as load_model returns -> acc = strict exact match,
    acc_norm = flexible exact match (the field names every task result shares)."""
    from lowbit.engine.llm import LLM
    from lowbit.engine.sampling_params import SamplingParams
    from lowbit.eval.task_data import load_task

    data = load_task("gsm8k")
    rows = data.rows[:limit] if limit is not None else data.rows
    k = DEFAULT_FEWSHOT if num_fewshot is None else num_fewshot
    shots = list(data.fewshot or [])[:k]
    prompts = [build_prompt(r["question"], shots) for r in rows]
    tok = triple[1]
    longest = max(len(tok.encode(p)) for p in prompts) if prompts else 0
    llm = LLM(triple, max_batch_size=batch_size, max_model_len=longest + max_new_tokens + 1, kv_bits=kv_bits)
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, stop=STOP)
    t0 = time.time()
    outputs = []
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), desc="gsm8k", unit="q", leave=False)
    try:
        for start in range(0, len(prompts), batch_size):  # a batch at a time: progress, bounded KV
            outputs += llm.generate(prompts[start:start + batch_size], params)
            if bar is not None:
                bar.update(len(prompts[start:start + batch_size]))
    finally:
        if bar is not None:
            bar.close()
    failed = [(i, o.error) for i, o in enumerate(outputs) if o.finish_reason == "error"]
    if failed:
        raise LowbitError(f"gsm8k: question {failed[0][0]} could not run: {failed[0][1]}")
    strict = [float(is_correct(strict_answer(o.text), r["answer"])) for o, r in zip(outputs, rows)]
    flexible = [float(is_correct(flexible_answer(o.text), r["answer"])) for o, r in zip(outputs, rows)]
    a, a_se = mean_stderr(strict) if strict else (float("nan"), float("nan"))
    f, f_se = mean_stderr(flexible) if flexible else (float("nan"), float("nan"))
    samples = [{"target": normalize(r["answer"]), "strict": strict_answer(o.text), "flexible": flexible_answer(o.text),
                "text": o.text} for o, r in zip(outputs, rows)]
    return TaskResult("gsm8k", k, len(rows), len(data.rows), a, a_se, f, f_se, time.time() - t0, data.files,
                      samples=samples, kv_bits=kv_bits)
