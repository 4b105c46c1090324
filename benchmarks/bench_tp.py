"""Tensor parallelism on a multi-GPU machine (issue 15): does a model split over N GPUs decode the
tokens one GPU does, and how fast, for dummy weights of a named shape, in one run.

    python3 benchmarks/bench_tp.py --arch llama2-7b --tp 1,2 --out $OUT

Per TP size: greedy tokens of a few prompts with the top-2 logprobs of each step (the TP=1 run is
the reference: a differing token is reported with the reference's top-1/top-2 gap, as an fp16
reduction in another order can flip a near tie of random weights), then decode tokens/s at the
given concurrencies (`lowbit bench generate`'s measurement). Writes bench_tp_<arch>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lowbit.bench.common import ModelSpec, environment, release_memory  # noqa: E402
from lowbit.bench.generate import GenerateOptions, run_generate  # noqa: E402
from lowbit.engine.llm import LLM  # noqa: E402
from lowbit.engine.sampling_params import SamplingParams  # noqa: E402
from lowbit.loading.dummy import build_dummy_model  # noqa: E402


def greedy_run(arch: str, w_bits: int, tp: int, steps: int) -> list[dict]:
    # rank 0 builds only its shard (the other ranks theirs): 70B in fp16 fits no single GPU
    shard = (0, tp) if tp > 1 else None
    llm = LLM(build_dummy_model(arch, w_bits, 128, "auto", "cuda:0", seed=1, shard=shard), max_batch_size=4,
              max_model_len=256,
              gpu_memory_utilization=0.8, tensor_parallel_size=tp)
    prompts = [[1, 450, 49], [1, 368, 338, 263, 124], [7, 8, 9, 10]]
    try:
        outs = llm.generate(prompts, SamplingParams(max_tokens=steps, ignore_eos=True, logprobs=2))
        # without logprobs the engine decodes greedy requests in runs of steps (num_scheduler_steps)
        runs = llm.generate(prompts, SamplingParams(max_tokens=steps, ignore_eos=True))
    finally:
        llm.close()
    return [{"tokens": o.token_ids, "top2": [[lp for _t, lp in step[1:3]] for step in o.logprobs],
             "tokens_in_runs": r.token_ids} for o, r in zip(outs, runs)]


def compare(ref: list[dict], got: list[dict]) -> dict:
    same, first_diffs = 0, []
    for r, g in zip(ref, got):
        n = next((i for i, (a, b) in enumerate(zip(r["tokens"], g["tokens"])) if a != b), None)
        if n is None:
            same += 1
        else:
            gap = r["top2"][n][0] - r["top2"][n][1]
            first_diffs.append({"step": n, "reference_top1_minus_top2_logprob": gap})
    # runs of steps must give the step-at-a-time tokens of the same TP size
    runs_same = sum(g["tokens_in_runs"] == g["tokens"] for g in got)
    return {"prompts_equal": same, "prompts": len(ref), "first_differences": first_diffs,
            "runs_equal_one_step_at_a_time": runs_same}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="llama2-7b")
    ap.add_argument("--w-bits", type=int, default=16)
    ap.add_argument("--tp", default="1,2", help="comma-separated TP sizes, 1 first (the reference)")
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=16, help="greedy tokens per prompt in the equality check")
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench-tp-out")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = [int(t) for t in args.tp.split(",")]
    rec = {"command": " ".join(sys.argv), "env": environment(torch.device("cuda")),
           "gpus": torch.cuda.device_count(), "runs": {}}
    reference = None
    for tp in sizes:
        run = {}
        try:
            greedy = greedy_run(args.arch, args.w_bits, tp, args.steps)
            reference = reference or greedy
            run["equality_vs_tp1"] = compare(reference, greedy)
            release_memory()
            spec = ModelSpec(dummy_weights=True, arch=args.arch, w_bits=args.w_bits, device="cuda:0")
            opts = GenerateOptions([int(c) for c in args.concurrency.split(",")], 1, args.output_len, [16], tp=tp)
            gen = run_generate(spec, opts, None, log=print)
            run["output_tokens_per_s"] = {r["concurrency"]: r["output_tokens_per_s"]
                                          for g in gen["runs"] for r in g.get("results", [])}
            run["errors"] = [g["error"] for g in gen["runs"] if "error" in g]
        except Exception as e:  # noqa: BLE001 - recorded; the next size still runs
            run["error"] = f"{type(e).__name__}: {e}"
        rec["runs"][tp] = run
        print(f"TP={tp}: {json.dumps(run)}", flush=True)
        release_memory()
    (out / f"bench_tp_{args.arch}_w{args.w_bits}.json").write_text(json.dumps(rec, indent=1, default=str))


if __name__ == "__main__":
    main()
