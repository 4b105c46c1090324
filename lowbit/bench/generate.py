"""`lowbit bench generate`: latency and throughput of generation at fixed concurrency.

For each concurrency c, c requests of `input_len` random prompt tokens start together and each
generates exactly `output_len` tokens (end-of-sequence ignored). A token's arrival time is when
the engine step that sampled it returns (the step reads the sampled ids back to the host, so the
GPU has finished it). Reported per concurrency: first-token latency (from submission), per-token
latency (the gap between a request's consecutive tokens, pooled over requests) at p50/p90/p99,
output tokens/s over the wave's wall time, and peak GPU memory.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from lowbit.bench.common import (ModelSpec, cuda_peak, cuda_peak_reset, device_of, environment, module_bytes,
                                 percentiles, release_memory, write_json)
from lowbit.engine.sampling_params import SamplingParams
from lowbit.errors import LowbitError
from lowbit.kernels._common import TUNE_LOG
from lowbit.layers.kernel_report import kernels_in_use


@dataclass
class GenerateOptions:
    concurrency: list[int] = field(default_factory=lambda: [1, 16, 64])
    input_len: int = 1
    output_len: int = 512
    kv_bits: list[int] = field(default_factory=lambda: [16])  # one engine per entry, same weights
    max_model_len: int | None = None  # default: input_len + output_len
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False
    warmup_tokens: int = 8
    seed: int = 0
    tp: int = 1  # tensor-parallel ranks (GPUs)

    def check(self) -> None:
        if not self.concurrency or min(self.concurrency) < 1:
            raise LowbitError(f"--concurrency {self.concurrency}: give positive integers, e.g. 1,16,64")
        if self.input_len < 1 or self.output_len < 1:
            raise LowbitError(f"--input-len {self.input_len} --output-len {self.output_len}: both must be >= 1")


def random_prompts(n: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n, length), generator=g).tolist()


def engine_info(llm) -> dict:
    runner, c = llm.engine.runner, llm.config
    return {"kv_bits": c.kv_bits, "block_size": c.block_size, "num_kv_blocks": runner.num_blocks,
            "kv_tokens": runner.num_blocks * c.block_size, "kv_cache_bytes": runner.cache.num_bytes,
            "max_model_len": c.max_model_len, "max_batch_size": c.max_batch_size,
            "cuda_graphs": runner.graph_status, "num_scheduler_steps": llm.engine.num_scheduler_steps,
            "kernels": kernels_in_use(runner.model, runner.cache),
            # which config the tuner chose per (kernel, shape bucket): e.g. gemvc = the CUDA gemv
            "tuned_kernels": [{"key": e["key"], "best": e["best"], "best_ms": e["best_ms"]} for e in TUNE_LOG]}


def run_wave(engine, prompts: list[list[int]], output_len: int) -> dict:
    """Runs the prompts to completion together -> timing of every token of every request."""
    params = SamplingParams(max_tokens=output_len, ignore_eos=True)
    arrivals: dict[str, list[float]] = {}
    errors: list[str] = []

    def sink(out):
        now = time.perf_counter()
        arrivals.setdefault(out.request_id, []).extend([now] * len(out.delta_token_ids))
        if out.error is not None:
            errors.append(str(out.error))

    t0 = time.perf_counter()
    for p in prompts:
        engine.add_request(p, params, engine.new_request_id(), sink)
    while engine.has_unfinished():
        engine.step()
    wall = time.perf_counter() - t0
    ttft = [ts[0] - t0 for ts in arrivals.values() if ts]
    itl = [b - a for ts in arrivals.values() for a, b in zip(ts, ts[1:])]
    n_out = sum(len(ts) for ts in arrivals.values())
    return {"requests": len(prompts), "output_tokens": n_out, "wall_s": wall,
            "output_tokens_per_s": n_out / wall if wall > 0 else None,
            "ttft_ms": percentiles(ttft, 1e3), "per_token_latency_ms": percentiles(itl, 1e3), "errors": errors}


def measure(llm, opts: GenerateOptions, vocab_size: int) -> list[dict]:
    device = llm.engine.runner.device
    engine = llm.engine
    results = []
    for i, c in enumerate(opts.concurrency):
        # a few steps at this batch size first: kernels compile and tune per shape on first use
        run_wave(engine, random_prompts(c, opts.input_len, vocab_size, opts.seed), opts.warmup_tokens)
        prompts = random_prompts(c, opts.input_len, vocab_size, opts.seed + 1 + i)
        cuda_peak_reset(device)
        res = run_wave(engine, prompts, opts.output_len)
        results.append({"concurrency": c, **res, "peak_memory_bytes": cuda_peak(device)})
    return results


def run_generate(spec: ModelSpec, opts: GenerateOptions, out_dir: Path | None = None,
                 log: Callable[[str], None] = print, loaded: tuple | None = None) -> dict:
    """Loads the model once (or takes the `loaded` triple), then per kv_bits builds an engine and
    measures every concurrency. A kv_bits whose engine fails is recorded with its error and the
    next one runs."""
    from lowbit.engine.llm import LLM

    opts.check()
    t0 = time.perf_counter()
    model, tok, ckpt = loaded or spec.load(opts.tp)
    device = device_of(model)
    name = spec.describe(model)
    record = {"bench": "generate", "model": name, "spec": asdict(spec), "options": asdict(opts),
              "env": environment(device), "load_s": time.perf_counter() - t0,
              "weights_bytes": module_bytes(model), "runs": []}
    max_len = opts.max_model_len or min(opts.input_len + opts.output_len, model.config.max_position_embeddings)
    for kv_bits in opts.kv_bits:
        run, llm = {"kv_bits": kv_bits}, None
        try:
            t1 = time.perf_counter()
            llm = LLM((model, tok, ckpt), kv_bits=kv_bits, max_batch_size=max(opts.concurrency),
                      max_model_len=max_len, gpu_memory_utilization=opts.gpu_memory_utilization,
                      enforce_eager=opts.enforce_eager, tensor_parallel_size=opts.tp)
            run["engine"] = {**engine_info(llm), "init_s": time.perf_counter() - t1}
            run["results"] = measure(llm, opts, model.config.vocab_size)
            # runs of decode steps enqueued behind the run before, without a host round trip between
            run["engine"]["runs_continued"] = llm.engine.runs_continued
            for r in run["results"]:
                lat = r["per_token_latency_ms"]
                log(f"{name} kv{kv_bits} c={r['concurrency']}: {r['output_tokens_per_s']:.1f} tok/s, "
                    f"per-token p50/p90/p99 {_ms(lat['p50'])}/{_ms(lat['p90'])}/{_ms(lat['p99'])} ms, "
                    f"first token p50 {_ms(r['ttft_ms']['p50'])} ms")
        except Exception as e:  # recorded, and the next configuration still runs
            run["error"] = f"{type(e).__name__}: {e}"
            log(f"{name} kv{kv_bits}: failed: {run['error']}")
        finally:
            if llm is not None:
                llm.close()
            llm = None
            release_memory()
        record["runs"].append(run)
    if out_dir is not None:
        from lowbit.bench.plots import plot_generate, try_plot

        record["json"] = str(write_json(out_dir, "generate", record))
        record["png"] = try_plot(plot_generate, [record], out_dir / "generate.png", log)
    return record


def _ms(x) -> str:
    return "-" if x is None else f"{x:.2f}"
