"""`lowbit bench serve`: load a running server the way users do and measure what they feel.

Sends `num_prompts` streamed chat requests, at most `concurrency` in flight, or arriving as a
Poisson process of `request_rate` per second (both: Poisson arrivals, capped in flight), as
LMDeploy's profile_restful_api and vLLM's benchmark_serving do. Records time to first token
(TTFT), the gaps between streamed chunks (inter-token latency, ITL: the engine sends one token
per sequence per step, so a chunk is a token except where text is held back at a possible stop
string or an unfinished UTF-8 character) and the whole request time. Prompts are paragraphs of a
real corpus from the datasets folder, or synthetic sentences, drawn with a fixed seed.
"""
from __future__ import annotations

import datetime
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from lowbit.errors import LowbitError

DEFAULT_CONCURRENCY = 8
SYNTHETIC = "synthetic"
_WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
          "government company number group problem fact river stone light music garden city road ship letter "
          "window morning story friend question answer idea night water paper color king bird song").split()


@dataclass
class RequestTiming:
    ok: bool
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    latency_s: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None


def prompt_set(n: int, dataset: str = "tinyshakespeare", seed: int = 0, max_chars: int = 400) -> list[str]:
    """n prompts: paragraphs of `dataset`'s eval split to continue, or with dataset "synthetic",
    requests built from a fixed word list (no data needed)."""
    rng = random.Random(seed)
    if dataset == SYNTHETIC:
        return [f"Write a short story that uses these words: {', '.join(rng.choices(_WORDS, k=12))}."
                for _ in range(n)]
    from lowbit.eval.datasets import load_text

    paragraphs = [p.strip() for p in load_text(dataset, "eval").split("\n\n") if len(p.strip()) > 40]
    if not paragraphs:
        raise LowbitError(f"dataset {dataset!r}: no paragraphs to make prompts from; try --dataset synthetic")
    return [f"Continue this text:\n{rng.choice(paragraphs)[:max_chars]}" for _ in range(n)]


def one_request(url: str, model: str, prompt: str, max_tokens: int, api_key: str | None) -> RequestTiming:
    from lowbit.serve.chat_client import chunk_text, stream_chat

    t0 = time.perf_counter()
    last, timing = None, RequestTiming(ok=False)
    try:
        for chunk in stream_chat(url, model, [{"role": "user", "content": prompt}], api_key, max_tokens=max_tokens,
                                 temperature=0.0):
            now = time.perf_counter()
            if chunk.get("usage"):
                timing.prompt_tokens = chunk["usage"]["prompt_tokens"]
                timing.output_tokens = chunk["usage"]["completion_tokens"]
            if chunk_text(chunk):
                if last is None:
                    timing.ttft_s = now - t0
                else:
                    timing.itl_s.append(now - last)
                last = now
        timing.ok = True
    except LowbitError as e:
        timing.error = str(e)
    timing.latency_s = time.perf_counter() - t0
    return timing


def bench_serve(url: str, num_prompts: int = 32, concurrency: int | None = None, request_rate: float | None = None,
                max_tokens: int = 64, dataset: str = "tinyshakespeare", seed: int = 0,
                api_key: str | None = None) -> dict:
    from lowbit.bench.common import percentiles
    from lowbit.serve.chat_client import model_name

    if concurrency is None and request_rate is None:
        concurrency = DEFAULT_CONCURRENCY
    model = model_name(url, api_key)
    prompts = prompt_set(num_prompts, dataset, seed)
    results: list[RequestTiming] = []
    lock = threading.Lock()

    def run(p):
        r = one_request(url, model, p, max_tokens, api_key)
        with lock:
            results.append(r)

    t0 = time.perf_counter()
    # the pool's size is the cap on requests in flight; with a rate alone, effectively none
    with ThreadPoolExecutor(max_workers=concurrency or min(256, num_prompts)) as pool:
        rng = random.Random(seed)
        for p in prompts:
            if request_rate:
                time.sleep(rng.expovariate(request_rate))  # Poisson arrivals
            pool.submit(run, p)
    wall = time.perf_counter() - t0
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "url": url, "model": model, "num_prompts": num_prompts, "concurrency": concurrency,
        "request_rate": request_rate, "max_tokens": max_tokens, "dataset": dataset, "seed": seed,
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": wall, "requests_per_s": len(ok) / wall, "output_tokens_per_s": out_tokens / wall,
        "prompt_tokens": sum(r.prompt_tokens for r in ok), "output_tokens": out_tokens,
        "ttft_ms": percentiles([r.ttft_s for r in ok if r.ttft_s is not None], 1000),
        "itl_ms": percentiles([x for r in ok for x in r.itl_s], 1000),
        "latency_ms": percentiles([r.latency_s for r in ok], 1000),
        # the raw samples, for the figure and for anyone who wants other statistics
        "samples_ms": {"ttft": [r.ttft_s * 1000 for r in ok if r.ttft_s is not None],
                       "itl": [x * 1000 for r in ok for x in r.itl_s]},
        "command": " ".join(sys.argv), "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def plot_serve(rec: dict, path: Path) -> Path:
    """TTFT and ITL as cumulative distributions, the percentiles marked."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, what in zip(axes, ("ttft", "itl"), ("time to first token", "inter-token latency")):
        xs = sorted(rec["samples_ms"][key])
        if xs:
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], drawstyle="steps-post")
        stats = rec[f"{key}_ms"]
        for pct, ls in (("p50", "-"), ("p90", "--"), ("p99", ":")):
            if stats[pct] is not None:
                ax.axvline(stats[pct], color="gray", ls=ls, lw=1, label=f"{pct} {stats[pct]:.1f} ms")
        ax.set_xlabel(f"{what} (ms)")
        ax.set_ylabel("share of samples")
        ax.set_title(f"{what} ({stats['n']} samples)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    load = f"concurrency {rec['concurrency']}" if not rec["request_rate"] else f"{rec['request_rate']} req/s"
    fig.suptitle(f"lowbit bench serve: {rec['model']}, {rec['completed']} requests, {load}: "
                 f"{rec['requests_per_s']:.2f} req/s, {rec['output_tokens_per_s']:.1f} output tok/s")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
