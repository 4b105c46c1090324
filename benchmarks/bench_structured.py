"""What structured output costs (issue 14: <= 10% of output tokens/s at concurrency 16): the same
requests with and without a JSON schema, in one process, on the default model (the real tokenizer
the grammar needs; a 135M model makes the mask's share of a step as large as it gets).

    python3 benchmarks/bench_structured.py --out $OUT                 # the GPU when there is one
    python3 benchmarks/bench_structured.py --device cpu --concurrency 4 --max-tokens 32

Both runs decode exactly --max-tokens tokens a request: the free-text requests ignore the end
token, the schema (an array of at least 100 objects) cannot end sooner. Writes bench_structured.json
with tokens/s of each, their ratio, and the mask time per constrained token measured apart.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCHEMA = {"type": "array", "minItems": 100,
          "items": {"type": "object",
                    "properties": {"name": {"type": "string", "maxLength": 12},
                                   "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                   "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                            "maxItems": 3}},
                    "required": ["name", "age", "tags"], "additionalProperties": False}}
ASK = "List people as JSON objects with name, age and tags."


def timed(llm, prompts, params) -> tuple[float, list]:
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    return time.perf_counter() - t0, outs


def mask_us_per_token(llm, tokens: list[list[int]]) -> float:
    """Mask computation alone, replaying the constrained outputs through fresh matchers."""
    from lowbit.engine.structured_output import StructuredOutput, allowed_tokens_bitmask

    engine = llm.engine
    matchers = [engine.grammars.matcher(StructuredOutput(json_schema=SCHEMA)) for _ in tokens]
    spent, steps = 0.0, 0
    for i in range(min(len(t) for t in tokens)):
        t0 = time.perf_counter()
        allowed_tokens_bitmask(matchers, engine.vocab_size)
        spent += time.perf_counter() - t0
        steps += 1
        for m, t in zip(matchers, tokens):
            m.consume(t[i])
    return spent / max(1, steps * len(tokens)) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default=None)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench-structured-out")
    args = ap.parse_args()
    import torch

    from lowbit import LLM, SamplingParams, StructuredOutput
    from lowbit.bench.common import environment

    llm = LLM("default", device=args.device, max_batch_size=args.concurrency)
    prompts = [llm.engine.tokenizer.encode_chat([{"role": "user", "content": f"{ASK} ({i})"}])
               for i in range(args.concurrency)]
    free = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    constrained = SamplingParams(max_tokens=args.max_tokens, structured_output=StructuredOutput(json_schema=SCHEMA))
    llm.generate(prompts, SamplingParams(max_tokens=8))  # warm-up: kernels, graphs, tuner
    llm.generate(prompts[:2], SamplingParams(max_tokens=8, structured_output=constrained.structured_output))
    rows = {}
    for rnd in range(2):  # interleaved twice: the spread says what a difference is worth
        for name, params in (("free", free), ("json_schema", constrained)):
            wall, outs = timed(llm, prompts, params)
            n = sum(len(o.token_ids) for o in outs)
            rows.setdefault(name, []).append({"wall_s": wall, "output_tokens": n, "tokens_per_s": n / wall,
                                              "finish": sorted({o.finish_reason for o in outs})})
            print(f"round {rnd} {name}: {n} tokens in {wall:.2f} s = {n / wall:.1f} tokens/s", flush=True)
            if name == "json_schema":
                last = outs
    best = {k: max(r["tokens_per_s"] for r in v) for k, v in rows.items()}
    record = {"bench": "structured_output", "command": " ".join(sys.argv), "concurrency": args.concurrency,
              "max_tokens": args.max_tokens, "schema": SCHEMA, "runs": rows, "best_tokens_per_s": best,
              "json_schema_over_free": best["json_schema"] / best["free"],
              "mask_us_per_token": mask_us_per_token(llm, [o.token_ids for o in last]),
              "env": environment(torch.device(llm.engine.runner.device))}
    print(f"json_schema / free = {record['json_schema_over_free']:.3f} (target >= 0.90); "
          f"mask {record['mask_us_per_token']:.0f} us per constrained token")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_structured.json").write_text(json.dumps(record, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
