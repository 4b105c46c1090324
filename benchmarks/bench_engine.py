"""Engine benchmark for the device: Llama-2-7B shapes with dummy weights, against issue 5's targets.

    python3 benchmarks/bench_engine.py                      # on the GPU: writes into $OUT (or --out)
    python3 benchmarks/bench_engine.py --arch tiny --device cpu --quick      # the same, small, on a CPU

Steps, each in its own process so that a crashing kernel costs only its own rows (the rest go on,
and the failure is recorded with the end of its log):
  1. fp16 weights: generate, input 1, output 512, concurrency 1 / 16 / 64, KV fp16 and int8
  2. W4A16 g128 (AWQ layout): the same
  3. memory: fp16 and W4A16 weights x KV fp16 / int8 / int4, and transformers' fp16 model
Each step writes its record as it goes, so one cut off by the time budget keeps what it finished.

Writes (at most 8 files come back from a device call): bench_engine.json (every record, the
device and versions, and each target with what was measured), bench_engine.png (throughput and
per-token latency against concurrency), bench_memory.png, bench_engine.log (all steps' output).
Needs torch (+ triton for the kernels); not typer; matplotlib only for the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# issue 5, on an H100 with Llama-2-7B shapes (input 1, output 512)
TARGETS = {"fp16 batch 1 tokens/s": 190.0, "W4A16 g128 batch 1 tokens/s": 600.0,
           "int8 KV tokens / fp16 KV tokens at the same memory": 1.9}


def child(args) -> None:
    """One step, in this process; its record goes to args.record after every part."""
    from lowbit.bench.common import ModelSpec, release_memory
    from lowbit.bench.generate import GenerateOptions, run_generate
    from lowbit.bench.memory import MemoryOptions, run_memory

    record_path = Path(args.record)
    spec = ModelSpec(dummy_weights=True, arch=args.arch, w_bits=args.w_bits, group_size=128, device=args.device,
                     dtype="fp16" if args.child == "memory" else "auto")

    def save(rec):
        record_path.write_text(json.dumps(rec, indent=1, default=str))

    if args.child == "memory":
        save(run_memory(spec, MemoryOptions(w_bits=[16, 4], kv_bits=[16, 8, 4], hf=True), None, log=_log))
        return
    conc = [1, 4] if args.quick else [1, 16, 64]
    out_len = 32 if args.quick else 512
    t0 = time.perf_counter()
    try:
        loaded = spec.load()
    except Exception as e:  # e.g. no W4A16 format in this tree: the step fails, the others run
        save({"model": spec.describe(), "error": f"{type(e).__name__}: {e}"})
        raise
    load_s = time.perf_counter() - t0
    rec = None
    for kv in (16, 8):  # one engine at a time; the record grows after each
        part = run_generate(spec, GenerateOptions(conc, 1, out_len, [kv]), None, log=_log, loaded=loaded)
        if rec is None:
            rec = {**part, "load_s": load_s}
        else:
            rec["runs"] += part["runs"]
        save(rec)
        release_memory()


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_steps(args, work: Path, log_file) -> dict:
    # seconds each step may take; seen on an H100 (2026-11-22): 53, 159 (112 of them W4A16 tuning
    # its tiles for every batch size before the graphs are captured) and 25; W4A16 timed out at 230 s
    # on a fresh machine (2026-11-28), which first builds the CUDA gemv (~60 s)
    steps = [("generate-fp16", ["--child", "generate", "--w-bits", "16"], 120),
             ("generate-w4a16", ["--child", "generate", "--w-bits", "4"], 330),
             ("memory", ["--child", "memory"], 90)]
    deadline = time.monotonic() + args.budget_s
    results = {}
    for name, extra, limit in steps:
        left = deadline - time.monotonic()
        record = work / f"{name}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--arch", args.arch, "--record", str(record), *extra]
        cmd += ["--device", args.device] if args.device else []
        cmd += ["--quick"] if args.quick else []
        if left < 30:
            results[name] = {"error": f"skipped: {args.budget_s:.0f} s budget spent"}
            continue
        print(f"== {name}: {' '.join(cmd)}", file=log_file, flush=True)
        step_log = work / f"{name}.log"
        t0 = time.monotonic()
        with open(step_log, "w") as f:
            try:
                proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=min(limit, left),
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=ROOT)
                status = None if proc.returncode == 0 else f"exit status {proc.returncode}"
            except subprocess.TimeoutExpired:
                status = f"timed out after {min(limit, left):.0f} s"
        text = step_log.read_text(errors="replace")
        log_file.write(text)
        rec = json.loads(record.read_text()) if record.exists() else {}
        if status:
            rec["error"] = f"{status}: {rec['error']}" if rec.get("error") else status
            rec["log_tail"] = text[-3000:]
        rec["step_s"] = time.monotonic() - t0
        results[name] = rec
        print(f"== {name}: {status or 'ok'} in {rec['step_s']:.0f} s", file=log_file, flush=True)
    return results


def _batch1(rec: dict) -> float | None:
    for run in rec.get("runs", []):
        if run.get("kv_bits") == 16:
            for r in run.get("results", []):
                if r["concurrency"] == 1:
                    return r["output_tokens_per_s"]
    return None


def summary(results: dict) -> dict:
    """Each target with what was measured; and concurrency-64 tokens/s per configuration."""
    mem = results.get("memory", {})
    rows = {(r.get("w_bits"), r.get("kv_bits")): r for r in mem.get("rows", [])}
    ratio = (rows.get((16, 8)) or {}).get("kv_tokens_vs_16bit")
    if ratio is None:  # from the generate step's engines, at the same gpu_memory_utilization
        tokens = {run["kv_bits"]: run["engine"]["kv_tokens"] for run in results.get("generate-fp16", {}).get("runs", [])
                  if "engine" in run}
        ratio = tokens[8] / tokens[16] if tokens.get(16) and tokens.get(8) else None
    measured = {"fp16 batch 1 tokens/s": _batch1(results.get("generate-fp16", {})),
                "W4A16 g128 batch 1 tokens/s": _batch1(results.get("generate-w4a16", {})),
                "int8 KV tokens / fp16 KV tokens at the same memory": ratio}
    targets = {k: {"target": v, "measured": measured[k], "met": None if measured[k] is None else measured[k] >= v}
               for k, v in TARGETS.items()}
    c64 = {}
    for name in ("generate-fp16", "generate-w4a16"):
        for run in results.get(name, {}).get("runs", []):
            for r in run.get("results", []):
                c64[f"{results[name].get('model', name)}, KV {run['kv_bits']}, concurrency {r['concurrency']}"] = \
                    r["output_tokens_per_s"]
    return {"targets": targets, "output_tokens_per_s_by_config": c64}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="llama2-7b")
    ap.add_argument("--device", default=None, help="cuda (default when present) | cpu")
    ap.add_argument("--quick", action="store_true", help="output 32 tokens, concurrency 1 and 4 (CPU check)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench-engine-out")
    ap.add_argument("--budget-s", type=float, default=560.0, help="stop starting steps after this many seconds")
    ap.add_argument("--child", choices=["generate", "memory"], help=argparse.SUPPRESS)
    ap.add_argument("--w-bits", type=int, default=16, help=argparse.SUPPRESS)
    ap.add_argument("--record", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, open(out / "bench_engine.log", "w") as log_file:
        results = run_steps(args, Path(tmp), log_file)
    env = next((r["env"] for r in results.values() if "env" in r), {})
    # the targets are stated for Llama-2-7B shapes on an H100; elsewhere they are only a yardstick
    applies = args.arch == "llama2-7b" and "H100" in str(env.get("device_name", ""))
    record = {"bench": "bench_engine", "arch": args.arch, "quick": args.quick, "env": env, "targets_apply": applies,
              "command": " ".join(sys.argv), "wall_s": time.monotonic() - t0, **summary(results), "steps": results}
    (out / "bench_engine.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    from lowbit.bench.plots import plot_generate, plot_memory, try_plot

    gens = [results[k] for k in ("generate-fp16", "generate-w4a16")
            if any(run.get("results") for run in results.get(k, {}).get("runs", []))]
    written = [out / "bench_engine.json", out / "bench_engine.log"]
    if gens:
        written.append(try_plot(plot_generate, gens, out / "bench_engine.png", _log))
    if any("kv_tokens" in r for r in results.get("memory", {}).get("rows", [])):
        written.append(try_plot(plot_memory, results["memory"], out / "bench_memory.png", _log))
    if not applies:
        print(f"(targets are for llama2-7b on an H100; this is {args.arch} on {env.get('device_name', '?')})")
    for name, t in record["targets"].items():
        m = t["measured"]
        print(f"{name}: {'-' if m is None else f'{m:.2f}'} (target {t['target']}, "
              f"{'met' if t['met'] else 'not met' if t['met'] is False else 'not measured'})")
    for name, rec in results.items():
        if rec.get("error"):
            print(f"{name}: {rec['error']}")
    print(f"wrote {', '.join(str(p) for p in written if p)} in {record['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
