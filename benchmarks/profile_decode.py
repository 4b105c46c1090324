"""Where one batch-1 decode step's time goes, on the device: per-kernel GPU time, kernel count and
the gap between them (launch latency and idle), for dummy weights of a named shape.

    python3 benchmarks/profile_decode.py --arch llama2-7b --w-bits 4 --out $OUT
    python3 benchmarks/profile_decode.py --arch llama2-7b --w-bits 4 --scheduler-steps 8 16 32 --out $OUT

Runs the engine as `lowbit bench generate` does (one prompt token, greedy), takes the decode step
time from a plain timed run of `--steps` tokens (CUDA graphs, as served), then records the same
steps with torch.profiler (CUPTI sees the kernels inside graph replays) and sums kernel time per
kernel name. Writes profile_<arch>_w<bits>.json and prints the table, largest first.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def timed_steps(llm, prompts, params, steps: int, batch: int) -> dict:
    """The engine's decode step as served (host work included), and the same step's CUDA graph
    replayed back to back (GPU only): their difference is the host's share of a step."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    llm.generate(prompts, params)
    torch.cuda.synchronize()
    step_us = (time.perf_counter() - t0) / steps * 1e6
    graphs = llm.engine.runner.graphs
    graph_us = None
    if graphs is not None:
        replay = graphs.graphs[next(s for s in graphs.sizes if s >= batch)]
        replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            replay()
        end.record()
        torch.cuda.synchronize()
        graph_us = start.elapsed_time(end) * 1e3 / steps
    return {"step_us": step_us, "graph_replay_us": graph_us}


def decode_profile(arch: str, w_bits: int, steps: int, kv_bits: int = 16, enforce_eager: bool = False,
                   batch: int = 1, trace: bool = True, env_ab: str | None = None,
                   scheduler_steps: list[int] | None = None) -> dict:
    from lowbit.bench.common import environment
    from lowbit.engine.llm import LLM
    from lowbit.engine.sampling_params import SamplingParams
    from lowbit.loading.dummy import build_dummy_model

    triple = build_dummy_model(arch, w_bits, 128)
    llm = LLM(triple, kv_bits=kv_bits, max_batch_size=batch, max_model_len=steps * 2 + 64,
              enforce_eager=enforce_eager, gpu_memory_utilization=0.5)
    params = SamplingParams(max_tokens=steps, ignore_eos=True)
    prompts = [[1 + i] for i in range(batch)]  # `batch` sequences decoding together
    llm.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True))  # warm-up (tuning, compile)
    ab = {}
    if env_ab:  # NAME=V1,V2,...: the step with each value, graphs recaptured, same process and tuning
        name, values = env_ab.split("=", 1)
        for rnd in range(2):  # twice, interleaved: the spread says what a difference is worth
            for value in values.split(","):
                os.environ[name] = value
                llm.engine.runner._capture_graphs()
                ab.setdefault(value, []).append(timed_steps(llm, prompts, params, steps, batch))
                print(f"{name}={value} round {rnd}: {ab[value][-1]}", flush=True)
    runs = {}
    if scheduler_steps:  # decode steps per host round trip: the host's share of a step against each
        import dataclasses

        base = llm.engine.config
        for rnd in range(2):
            for n in scheduler_steps:
                llm.engine.config = dataclasses.replace(base, num_scheduler_steps=n)
                runs.setdefault(n, []).append(timed_steps(llm, prompts, params, steps, batch))
                print(f"num_scheduler_steps={n} round {rnd}: {runs[n][-1]}", flush=True)
        llm.engine.config = base
    step_us, graph_us = timed_steps(llm, prompts, params, steps, batch).values()
    if not trace:
        return {"arch": arch, "w_bits": w_bits, "kv_bits": kv_bits, "steps": steps, "batch": batch,
                "step_us_timed": step_us, "graph_replay_us": graph_us, "env_ab": ab, "scheduler_steps": runs,
                "cuda_graphs": llm.engine.runner.graph_status, "env": environment(torch.device("cuda")), "rows": []}

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, params)
        torch.cuda.synchronize()
    # The chrome trace carries each kernel's grid and block, which tell apart the calls of one
    # kernel on different shapes (e.g. the gemv's qkv, o, gate_up and down).
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        trace = json.loads(Path(f"{tmp}/trace.json").read_text())["traceEvents"]
    kernels = [(e["ts"], e["ts"] + e["dur"], _kernel_key(e)) for e in trace
               if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    by_name: dict[str, list[float]] = defaultdict(list)
    for start, end, key in kernels:
        by_name[key].append(end - start)
    total_us = sum(sum(v) for v in by_name.values())
    span = (max(e[1] for e in kernels) - min(e[0] for e in kernels)) if kernels else 0
    # With PDL a kernel starts while the one before runs, so its own duration includes waiting. What
    # it costs the step is how far it moves the chain's end: its end minus the previous kernel's end.
    # Time when no kernel runs at all (launch gaps, host waits) is counted apart as idle.
    advance: dict[str, float] = defaultdict(float)
    idle = 0.0
    ordered = sorted(kernels, key=lambda e: e[1])
    for prev, e in zip(ordered, ordered[1:]):
        advance[e[2]] += e[1] - max(prev[1], e[0])
        idle += max(0.0, e[0] - prev[1])
    rows = sorted(({"kernel": k, "calls_per_step": len(v) / steps, "us_per_step": sum(v) / steps,
                    "us_per_call": sum(v) / len(v), "advance_us_per_step": advance[k] / steps}
                   for k, v in by_name.items()),
                  key=lambda r: -r["advance_us_per_step"])
    return {"arch": arch, "w_bits": w_bits, "kv_bits": kv_bits, "steps": steps, "batch": batch,
            "output_tokens_per_s_timed": batch * 1e6 / step_us, "cuda_graphs": llm.engine.runner.graph_status,
            "step_us_timed": step_us, "tokens_per_s_timed": 1e6 / step_us, "graph_replay_us": graph_us,
            "scheduler_steps": runs,
            "kernels_per_step": len(kernels) / steps, "kernel_us_per_step": total_us / steps,
            "profiled_span_us_per_step": span / steps, "idle_us_per_step": idle / steps, "env": environment(torch.device("cuda")), "rows": rows}


def _kernel_key(event: dict) -> str:
    """A trace event's kernel name (shortened) with its grid and block."""
    name = event["name"].replace("void ", "").replace("(anonymous namespace)::", "")
    name = name.split("(")[0] if "<" in name else name[:60]
    args = event.get("args", {})
    return f"{name} grid {args['grid']} block {args['block']}" if "grid" in args else name


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="llama2-7b")
    ap.add_argument("--w-bits", type=int, nargs="+", default=[4])
    ap.add_argument("--kv-bits", type=int, default=16)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--batch", type=int, default=1, help="sequences decoding together")
    ap.add_argument("--no-trace", action="store_true", help="timings only, no torch.profiler pass")
    ap.add_argument("--env-ab", help="NAME=V1,V2: time the step with each value of an environment variable "
                                     "read at graph capture (e.g. LOWBIT_FUSED_PROLOGUES=0,1), in one process")
    ap.add_argument("--scheduler-steps", type=int, nargs="+",
                    help="time the step with each num_scheduler_steps (decode steps per host round trip), in one process")
    ap.add_argument("--out", default=os.environ.get("OUT") or "profile-out")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for w in args.w_bits:
        # the last engine (its KV cache, CUDA graphs, reference cycles) must be gone before the next
        # sizes its cache from free memory: else --w-bits 16 4 left the second no KV blocks
        gc.collect()
        torch.cuda.empty_cache()
        rec = decode_profile(args.arch, w, args.steps, args.kv_bits, args.eager, args.batch, not args.no_trace,
                             args.env_ab, args.scheduler_steps)
        rec["command"] = " ".join(sys.argv)
        if args.no_trace:
            (out / f"steps_{args.arch}_w{w}_kv{args.kv_bits}_b{args.batch}.json").write_text(
                json.dumps(rec, indent=1, default=str))
            print(f"\n== {args.arch} w{w} batch {args.batch}: step {rec['step_us_timed']:.0f} us as served, "
                  f"graph replay {rec['graph_replay_us']:.0f} us")
            continue
        (out / f"profile_{args.arch}_w{w}_kv{args.kv_bits}_b{args.batch}.json").write_text(json.dumps(rec, indent=1, default=str))
        print(f"\n== {args.arch} w{w} kv{args.kv_bits} batch {args.batch}: {rec['output_tokens_per_s_timed']:.1f} "
              f"output tok/s, step "
              f"{rec['step_us_timed']:.0f} us, {rec['kernels_per_step']:.0f} kernels/step, kernel time "
              f"{rec['kernel_us_per_step']:.0f} us/step, idle {rec['idle_us_per_step']:.0f} us/step, graph replay {rec['graph_replay_us']:.0f} us/step, span {rec['profiled_span_us_per_step']:.0f} us/step "
              f"({rec['cuda_graphs']})")
        for r in rec["rows"][:30]:
            print(f"{r['advance_us_per_step']:9.1f} us on the chain {r['us_per_step']:9.1f} us in kernel "
                  f"{r['calls_per_step']:6.1f}x {r['us_per_call']:8.2f} us  {r['kernel']}")
        del rec


if __name__ == "__main__":
    main()
