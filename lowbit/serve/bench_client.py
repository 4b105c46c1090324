"""`lowbit bench serve`: load a running server the way users do and measure what they feel.

Sends `num_prompts` streamed chat requests, at most `concurrency` at a time, or arriving as a
Poisson process of `request_rate` per second (LMDeploy's profile_restful_api / vLLM's
benchmark_serving); records time to first token (TTFT), the gaps between streamed chunks
(inter-token latency, ITL) and the whole request time. Prompts are paragraphs of a real corpus
from the datasets folder, drawn with a fixed seed.
"""
from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from lowbit.errors import LowbitError


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
    from lowbit.eval.datasets import load_text

    paragraphs = [p.strip() for p in load_text(dataset, "eval").split("\n\n") if len(p.strip()) > 40]
    if not paragraphs:
        raise LowbitError(f"dataset {dataset!r}: no paragraphs to make prompts from")
    rng = random.Random(seed)
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


def bench_serve(url: str, num_prompts: int = 32, concurrency: int | None = 8, request_rate: float | None = None,
                max_tokens: int = 64, dataset: str = "tinyshakespeare", seed: int = 0,
                api_key: str | None = None) -> dict:
    from lowbit.bench.common import percentiles
    from lowbit.serve.chat_client import model_name

    model = model_name(url, api_key)
    prompts = prompt_set(num_prompts, dataset, seed)
    results: list[RequestTiming] = []
    lock = threading.Lock()

    def run(p):
        r = one_request(url, model, p, max_tokens, api_key)
        with lock:
            results.append(r)

    t0 = time.perf_counter()
    workers = concurrency if request_rate is None else min(256, num_prompts)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        rng = random.Random(seed)
        for p in prompts:
            if request_rate:
                time.sleep(rng.expovariate(request_rate))  # Poisson arrivals
            pool.submit(run, p)
    wall = time.perf_counter() - t0
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "url": url, "model": model, "num_prompts": num_prompts, "concurrency": concurrency if not request_rate else None,
        "request_rate": request_rate, "max_tokens": max_tokens, "dataset": dataset, "seed": seed,
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": wall, "requests_per_s": len(ok) / wall, "output_tokens_per_s": out_tokens / wall,
        "prompt_tokens": sum(r.prompt_tokens for r in ok), "output_tokens": out_tokens,
        "ttft_ms": percentiles([r.ttft_s for r in ok if r.ttft_s is not None], 1000),
        "itl_ms": percentiles([x for r in ok for x in r.itl_s], 1000),
        "latency_ms": percentiles([r.latency_s for r in ok], 1000),
    }
