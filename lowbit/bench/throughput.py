"""`lowbit bench throughput`: offline throughput, vLLM's `benchmark_throughput` in our engine.

All requests are submitted at once and the engine runs until the last finishes; reported are
requests/s, output tokens/s and total (prompt + output) tokens/s over that wall time.

Requests come from a conversational dataset when one is found by name under the data roots
(shared/data, $LOWBIT_DATA_DIR): ShareGPT-style JSON, the first human turn as the prompt and the
length of the reply that followed as the output length (vLLM's convention). Otherwise, and always
with dummy weights (no tokenizer), lengths are drawn uniformly from [len * (1 - range_ratio),
len * (1 + range_ratio)] with a fixed seed, prompt tokens uniformly from the vocabulary (vLLM's
`random` dataset); the JSON says which was used.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from lowbit.bench.common import ModelSpec, cuda_peak, cuda_peak_reset, device_of, environment, write_json
from lowbit.bench.generate import engine_info
from lowbit.engine.sampling_params import SamplingParams
from lowbit.errors import LowbitError

MIN_LEN = 4  # vLLM drops conversations whose prompt or reply is shorter than this


@dataclass
class ThroughputOptions:
    dataset: str = "sharegpt"
    num_prompts: int = 1000
    input_len: int = 512  # synthetic lengths: the mean of each range
    output_len: int = 128
    range_ratio: float = 0.5
    kv_bits: int = 16
    max_batch_size: int = 64
    max_model_len: int | None = None  # default: the longest request
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False
    seed: int = 0
    tp: int = 1  # tensor-parallel ranks (GPUs)

    def check(self) -> None:
        if self.num_prompts < 1:
            raise LowbitError(f"--num-prompts {self.num_prompts}: must be at least 1")
        if not 0 <= self.range_ratio < 1:
            raise LowbitError(f"--range-ratio {self.range_ratio}: must be in [0, 1)")
        if self.input_len < 1 or self.output_len < 1:
            raise LowbitError(f"--input-len {self.input_len} --output-len {self.output_len}: both must be >= 1")


def synthetic_requests(opts: ThroughputOptions, vocab_size: int) -> list[tuple[list[int], int]]:
    g = torch.Generator().manual_seed(opts.seed)

    def lengths(mean: int) -> list[int]:
        lo, hi = max(1, int(mean * (1 - opts.range_ratio))), max(1, int(mean * (1 + opts.range_ratio)))
        return torch.randint(lo, hi + 1, (opts.num_prompts,), generator=g).tolist()

    ins, outs = lengths(opts.input_len), lengths(opts.output_len)
    return [(torch.randint(0, vocab_size, (n,), generator=g).tolist(), m) for n, m in zip(ins, outs)]


def find_conversations(name: str) -> Path | None:
    """A JSON/JSONL file of conversations under a data-root folder (or file) named like `name`."""
    from lowbit.eval.datasets import data_roots

    want = re.sub(r"[^a-z0-9]", "", name.lower())
    for root in data_roots():
        for p in sorted(root.iterdir()):
            if want not in re.sub(r"[^a-z0-9]", "", p.stem.lower()):
                continue
            files = [p] if p.is_file() else sorted(p.glob("*.json")) + sorted(p.glob("*.jsonl"))
            if files:
                return files[0]
    return None


def conversation_requests(path: Path, tokenizer, opts: ThroughputOptions, max_len: int) -> list[tuple[list[int], int]]:
    text = path.read_text()
    records = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" \
        else json.loads(text)
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(opts.seed)).tolist()
    out = []
    for i in order:
        turns = records[i].get("conversations") or records[i].get("messages") or []
        if len(turns) < 2:
            continue
        prompt = tokenizer.encode(turns[0].get("value") or turns[0].get("content") or "")
        reply = len(tokenizer.encode(turns[1].get("value") or turns[1].get("content") or ""))
        if len(prompt) < MIN_LEN or reply < MIN_LEN or len(prompt) + reply > max_len:
            continue
        out.append((prompt, reply))
        if len(out) == opts.num_prompts:
            break
    if not out:
        raise LowbitError(f"{path}: no conversation with a prompt and a reply of {MIN_LEN}+ tokens that fits "
                          f"{max_len} tokens")
    return out


def run_throughput(spec: ModelSpec, opts: ThroughputOptions, out_dir: Path | None = None,
                   log: Callable[[str], None] = print) -> dict:
    from lowbit.engine.llm import LLM

    opts.check()
    model, tok, ckpt = spec.load(opts.tp)
    device = device_of(model)
    ctx = model.config.max_position_embeddings
    path = None if spec.dummy_weights else find_conversations(opts.dataset)
    if path is not None:
        requests = conversation_requests(path, tok, opts, opts.max_model_len or ctx)
        source = {"dataset": str(path), "synthetic": False}
    else:
        requests = synthetic_requests(opts, model.config.vocab_size)
        why = "dummy weights have no tokenizer" if spec.dummy_weights else \
            f"no conversational dataset named {opts.dataset!r} under the data roots"
        source = {"dataset": f"synthetic ({why}), seed {opts.seed}", "synthetic": True}
    longest = max(len(p) + n for p, n in requests)
    max_len = opts.max_model_len or min(longest, ctx)
    llm = LLM((model, tok, ckpt), kv_bits=opts.kv_bits, max_batch_size=opts.max_batch_size, max_model_len=max_len,
              gpu_memory_utilization=opts.gpu_memory_utilization, enforce_eager=opts.enforce_eager,
              tensor_parallel_size=opts.tp)
    engine = llm.engine
    finals = {}

    def sink(out):
        if out.finished:
            finals[out.request_id] = out

    cuda_peak_reset(device)
    t0 = time.perf_counter()
    for prompt, n in requests:
        try:
            engine.add_request(prompt, SamplingParams(max_tokens=n, ignore_eos=True), engine.new_request_id(), sink)
        except LowbitError as e:  # too long for max_model_len: counted, not run
            finals[f"rejected-{len(finals)}"] = e
    while engine.has_unfinished():
        engine.step()
    wall = time.perf_counter() - t0
    ok = [o for o in finals.values() if not isinstance(o, Exception) and o.error is None]
    prompt_tokens = sum(len(o.prompt_token_ids) for o in ok)
    output_tokens = sum(len(o.token_ids) for o in ok)
    result = {"requests": len(requests), "completed": len(ok), "failed": len(requests) - len(ok), "wall_s": wall,
              "requests_per_s": len(ok) / wall, "output_tokens_per_s": output_tokens / wall,
              "total_tokens_per_s": (prompt_tokens + output_tokens) / wall,
              "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
              "preemptions": engine.scheduler.num_preemptions, "peak_memory_bytes": cuda_peak(device)}
    record = {"bench": "throughput", "model": spec.describe(model), "spec": asdict(spec), "options": asdict(opts),
              **source, "env": environment(device), "engine": engine_info(llm), "result": result}
    llm.close()
    log(f"{record['model']} kv{opts.kv_bits}: {len(ok)}/{len(requests)} requests in {wall:.1f}s: "
        f"{result['requests_per_s']:.2f} req/s, {result['output_tokens_per_s']:.1f} output tok/s, "
        f"{result['total_tokens_per_s']:.1f} total tok/s ({source['dataset']})")
    if out_dir is not None:
        from lowbit.bench.plots import plot_throughput, try_plot

        record["json"] = str(write_json(out_dir, "throughput", record))
        record["png"] = try_plot(plot_throughput, [record], out_dir / "throughput.png", log)
    return record
