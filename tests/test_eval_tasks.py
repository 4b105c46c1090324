"""`lowbit eval tasks`: the harness's prompt formats on real rows, and our batched log-likelihoods
against transformers' model computing the same continuations directly."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from lowbit.eval.task_data import load_task
from lowbit.eval.task_formats import build_items, interleave_subjects
from lowbit.eval.tasks import mean_stderr, score_items

ARC_SHA256 = "a03a11a8fee86f6d0607f426e7b3b7a9180a4894170e934da75596e93c4b51f1"  # shared/data/README.md
TEST_DATA = Path(__file__).parent / "data"  # small copies of shared/data (tests/data/README.md)


@pytest.fixture(autouse=True)
def _task_data(monkeypatch):
    """The task files come from tests/data, so a clean clone without ../shared runs these tests
    (the CLI subprocesses inherit the variable)."""
    monkeypatch.setenv("LOWBIT_DATA_DIR", str(TEST_DATA))


def test_prompt_formats_are_the_harness_formats():
    hs = build_items("hellaswag", load_task("hellaswag").rows[:1], None, None)[0]
    # ctx "A man is sitting on a roof. he": ctx_a + " " + ctx_b.capitalize()
    assert hs.context == "Roof shingle removal: A man is sitting on a roof. He"
    assert hs.choices[3] == "starts pulling up roofing on a roof." and hs.gold == 3
    arc = build_items("arc_challenge", load_task("arc_challenge").rows[:1], None, None)[0]
    assert arc.context.startswith("Question: An astronomer observes") and arc.context.endswith("?\nAnswer:")
    assert arc.choices[0] == "Planetary density will decrease."
    bq = build_items("boolq", load_task("boolq").rows[:1], None, None)[0]
    assert bq.context.endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert bq.choices == ["no", "yes"]
    mmlu = load_task("mmlu")
    item = build_items("mmlu", interleave_subjects(mmlu.rows)[:1], mmlu.fewshot, 2)[0]
    head = "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
    first_dev = mmlu.fewshot["abstract_algebra"][0]
    assert item.context.startswith(head + first_dev["question"].strip() + "\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n")
    assert item.context.count("\nAnswer:") == 3 and item.context.endswith("\nD. " + mmlu.rows[0]["choices"][3]
                                                                             + "\nAnswer:")
    assert item.choices == ["A", "B", "C", "D"]
    assert [r["subject"] for r in interleave_subjects(mmlu.rows)[:2]] == ["abstract_algebra", "anatomy"]
    assert mean_stderr([1.0, 0.0, 1.0, 0.0]) == pytest.approx((0.5, math.sqrt(1 / 3 / 4)))


def _hf_loglik(hf, tok, context: str, continuation: str) -> float:
    # the harness's rule, written out again: continuation tokens = tokens of the whole past the context's
    ctx = tok.encode(context, add_special_tokens=False)
    cont = tok.encode(context + continuation, add_special_tokens=False)[len(ctx):]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(hf(ids[:, :-1]).logits[0].double(), -1)
    return float(logp[-len(cont):].gather(1, torch.tensor(cont)[:, None]).sum())


def test_task_logliks_match_transformers(smol, hf_smol):
    model, tok, _ = smol
    items = build_items("hellaswag", load_task("hellaswag").rows[:2], None, None)
    items += build_items("arc_challenge", load_task("arc_challenge").rows[:2], None, None)
    bq = load_task("boolq").rows
    items += build_items("boolq", [min(bq[:50], key=lambda r: len(r["passage"]))], None, None)
    mmlu = load_task("mmlu")
    items += build_items("mmlu", mmlu.rows[:1], mmlu.fewshot, 1)
    ours = score_items(model, tok, items, batch_size=3)  # batches mix lengths: right padding is exercised
    for it, lls in zip(items, ours):
        direct = [_hf_loglik(hf_smol, tok, it.context, " " + c) for c in it.choices]
        assert lls == pytest.approx(direct, abs=2e-3), (it.context[-60:], lls, direct)
        assert all(-200 < x < 0 for x in lls)
        # the prediction is the argmax of each; real differences between choices, not ties
        assert max(lls) - min(lls) > 1e-3


def test_task_scoring_through_a_quantized_kv_cache(smol):
    """--kv-bits 8: each sequence attends through an int8 paged cache, which moves the
    log-likelihoods a little (by up to 0.28 of ~31 nats, 0.9%, on an AVX-512 machine; less than 0.15
    on an AVX2 one) and keeps the prediction; 16-bit KV through the same cache changes nothing."""
    model, tok, _ = smol
    items = build_items("arc_challenge", load_task("arc_challenge").rows[:1], None, None)
    plain = score_items(model, tok, items)[0]
    assert score_items(model, tok, items, kv_bits=16)[0] == plain
    int8 = score_items(model, tok, items, kv_bits=8)[0]
    assert int8 != plain and int8 == pytest.approx(plain, rel=0.02)
    assert max(range(len(plain)), key=plain.__getitem__) == max(range(len(int8)), key=int8.__getitem__)


def test_eval_tasks_cli_writes_json(tmp_path):
    out = tmp_path / "tasks.json"
    r = run_cli("eval", "tasks", "default", "--tasks", "arc_challenge", "--limit", "3", "--batch-size", "2",
                "--json", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    (arc,) = res["tasks"]
    assert arc["task"] == "arc_challenge" and arc["n"] == 3 and arc["total"] == 1172 and arc["num_fewshot"] == 0
    assert 0 <= arc["acc"] <= 1 and 0 <= arc["acc_norm"] <= 1 and arc["acc_stderr"] >= 0
    assert res["command"].startswith("lowbit eval tasks default --tasks arc_challenge")
    assert list(res["data_sha256"].values()) == [ARC_SHA256]
    assert res["versions"]["torch"] == torch.__version__
    assert "arc_challenge" in r.stdout and "acc_norm" in r.stdout


def test_unknown_task_is_one_line():
    r = run_cli("eval", "tasks", "default", "--tasks", "no_such_task")
    assert r.returncode == 2 and "no_such_task" in r.stderr and "Traceback" not in r.stderr


def test_gsm8k_answers_are_extracted_and_matched_as_the_harness_does():
    from lowbit.eval.gsm8k import INVALID, flexible_answer, is_correct, normalize, strict_answer

    text = "She pays 2 * $1,200 = $2,400.\n#### 2,400\n\nThe answer is 2400."
    assert strict_answer(text) == "2,400" and flexible_answer(text) == "2400."
    assert is_correct(strict_answer(text), "... #### 2400") and is_correct(flexible_answer(text), "#### 2400")
    assert normalize("Natalia sold 48/2 = 24 clips.\n#### 72") == "72"
    assert strict_answer("no marker: 5") == INVALID and flexible_answer("no digits") == INVALID
    assert not is_correct(INVALID, "#### 5") and not is_correct("-5", "#### 5")


def test_gsm8k_prompt_is_the_harness_format():
    from lowbit.eval.gsm8k import build_prompt

    shots = [{"question": "Q1?", "answer": "A1\n#### 1"}, {"question": "Q2?", "answer": "#### 2"}]
    assert build_prompt("Q3?", shots) == "Question: Q1?\nAnswer: A1\n#### 1\n\nQuestion: Q2?\nAnswer: #### 2\n\nQuestion: Q3?\nAnswer:"


def test_gsm8k_generates_through_the_engine(smol):
    """Two questions, one exemplar, batched in the engine: each sample's extractions are those of its
    text, generation stopped before the next "Question:", and the batched text is what one request
    alone generates (greedy)."""
    from lowbit.engine.llm import LLM
    from lowbit.engine.sampling_params import SamplingParams
    from lowbit.eval.gsm8k import STOP, build_prompt, flexible_answer, strict_answer
    from lowbit.eval.gsm8k import evaluate_gsm8k

    res = evaluate_gsm8k(smol, limit=2, num_fewshot=1, batch_size=2, max_new_tokens=16, show_progress=False)
    assert (res.task, res.n, res.total, res.num_fewshot) == ("gsm8k", 2, 3, 1)
    assert 0.0 <= res.acc <= 1.0 and 0.0 <= res.acc_norm <= 1.0
    for s in res.samples:
        assert s["strict"] == strict_answer(s["text"]) and s["flexible"] == flexible_answer(s["text"])
        assert "Question:" not in s["text"]
    data = load_task("gsm8k")
    alone = LLM(smol, max_batch_size=1).generate(build_prompt(data.rows[1]["question"], data.fewshot[:1]),
                                                 SamplingParams(max_tokens=16, stop=STOP))
    assert alone[0].text == res.samples[1]["text"]
