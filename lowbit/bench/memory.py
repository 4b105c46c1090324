"""`lowbit bench memory`: what the weights and the KV cache take, per weight format and KV width.

Per weight format (fp16, and W4A16 with dummy weights): the bytes the model holds (every tensor,
including unpacked forms a kernel keeps), the bytes of its checkpoint tensors (the format as
stored), and the peak while building it. Per KV width: bytes per token (codes + scale/zero for
int8/int4), per 2048- and 4096-token sequence, and the tokens the engine's cache holds at the
same `gpu_memory_utilization` (on the CPU, at the same fixed cache size), with the ratio to the
16-bit cache. transformers' own fp16 model of the same shape is measured in the same run where
its weights fit: weights, KV bytes per token of its DynamicCache after a 2048-token prompt, and
the peak of that prefill.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from lowbit.bench.common import ModelSpec, device_of, environment, fmt_bytes, module_bytes, release_memory, write_json
from lowbit.bench.generate import engine_info
from lowbit.layers.paged_kv_cache import PagedKVCache

HF_FITS_FRACTION = 0.8  # try transformers' model only when its fp16 weights take at most this much of the device


@dataclass
class MemoryOptions:
    w_bits: list[int] = field(default_factory=lambda: [16, 4])  # 4 applies to dummy weights only
    kv_bits: list[int] = field(default_factory=lambda: [16, 8, 4])
    seq_lens: list[int] = field(default_factory=lambda: [2048, 4096])
    max_model_len: int | None = None  # default: min(4096, the model's context)
    gpu_memory_utilization: float = 0.9
    hf: bool = True
    hf_prompt_len: int = 2048


def _cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def _weights_row(spec: ModelSpec, log) -> tuple[tuple, dict]:
    device = torch.device(spec.device) if spec.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if _cuda(device):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    triple = spec.load()
    model = triple[0]
    row = {"weights": spec.describe(model), "w_bits": spec.w_bits, "dtype": str(model.model.embed_tokens.weight.dtype),
           "load_s": time.perf_counter() - t0, "weights_bytes": module_bytes(model),
           # persistent tensors only: what a checkpoint of this format stores
           "weights_bytes_stored": sum(t.numel() * t.element_size() for t in model.state_dict().values()),
           "load_peak_bytes": None, "weights_allocated_bytes": None}
    if _cuda(device):
        torch.cuda.synchronize()
        row["load_peak_bytes"] = torch.cuda.max_memory_allocated() - base
        row["weights_allocated_bytes"] = torch.cuda.memory_allocated() - base
    log(f"{row['weights']}: weights {fmt_bytes(row['weights_bytes'])} held, "
        f"{fmt_bytes(row['weights_bytes_stored'])} as stored")
    return triple, row


def _kv_row(triple, kv_bits: int, opts: MemoryOptions, max_len: int) -> dict:
    from lowbit.engine.llm import LLM

    model = triple[0]
    cfg, dtype, device = model.config, model.model.embed_tokens.weight.dtype, device_of(model)
    per_token = PagedKVCache.bytes_per_token(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, kv_bits, dtype)
    dense = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, str(dtype))
    row = {"kv_bits": kv_bits, "kv_dtype": "int8" if kv_bits == 8 else "int4" if kv_bits == 4 else dense,
           "kv_bytes_per_token": per_token, **{f"kv_bytes_per_{n}_tokens": per_token * n for n in opts.seq_lens}}
    if _cuda(device):
        torch.cuda.reset_peak_memory_stats()
    llm = LLM(triple, kv_bits=kv_bits, max_model_len=max_len, gpu_memory_utilization=opts.gpu_memory_utilization,
              enforce_eager=True)
    row.update({k: v for k, v in engine_info(llm).items() if k in ("num_kv_blocks", "kv_tokens", "kv_cache_bytes", "kernels")})
    if _cuda(device):
        torch.cuda.synchronize()
        row["engine_init_peak_bytes"] = torch.cuda.max_memory_allocated()
    llm.shutdown()
    return row


def hf_figures(cfg, dtype: torch.dtype, device: torch.device, prompt_len: int) -> dict:
    """transformers' LlamaForCausalLM of the same shape, random weights made on the device."""
    import transformers

    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "torch_dtype")})
    if _cuda(device):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with torch.device(device):
        model = transformers.LlamaForCausalLM._from_config(hf_cfg, dtype=dtype).eval()
    out = {"transformers": transformers.__version__, "dtype": str(dtype),
           "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    if _cuda(device):
        torch.cuda.synchronize()
        out["load_peak_bytes"] = torch.cuda.max_memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()
    n = min(prompt_len, cfg.max_position_embeddings)
    ids = torch.randint(0, cfg.vocab_size, (1, n), device=device)
    with torch.inference_mode():
        res = model(ids, use_cache=True, logits_to_keep=1)
    kv = sum(t.numel() * t.element_size() for layer in res.past_key_values.layers for t in (layer.keys, layer.values))
    out.update({"prompt_tokens": n, "kv_bytes_per_token": kv // n, "kv_bytes": kv})
    if _cuda(device):
        torch.cuda.synchronize()
        out["prefill_peak_bytes"] = torch.cuda.max_memory_allocated() - base
    del model, res
    return out


def run_memory(spec: ModelSpec, opts: MemoryOptions, out_dir: Path | None = None,
               log: Callable[[str], None] = print) -> dict:
    weight_specs = [replace(spec, w_bits=w) for w in (opts.w_bits if spec.dummy_weights else [16])]
    name = f"{spec.arch} dummy weights" if spec.dummy_weights else spec.model
    record = {"bench": "memory", "model": name, "spec": asdict(spec), "options": asdict(opts), "rows": [],
              "weights": []}
    device = None
    for ws in weight_specs:
        try:
            triple, wrow = _weights_row(ws, log)
        except Exception as e:
            record["weights"].append({"weights": ws.describe(), "w_bits": ws.w_bits, "error": f"{type(e).__name__}: {e}"})
            log(f"{ws.describe()}: failed: {e}")
            release_memory()
            continue
        model = triple[0]
        device = device_of(model)
        record.setdefault("env", environment(device))
        record["weights"].append(wrow)
        max_len = opts.max_model_len or min(4096, model.config.max_position_embeddings)
        for kv_bits in opts.kv_bits:
            try:
                row = {"weights": wrow["weights"], "w_bits": ws.w_bits, **_kv_row(triple, kv_bits, opts, max_len)}
            except Exception as e:
                row = {"weights": wrow["weights"], "w_bits": ws.w_bits, "kv_bits": kv_bits,
                       "error": f"{type(e).__name__}: {e}"}
            record["rows"].append(row)
            release_memory()
        if opts.hf and ws.w_bits == 16:
            record["hf"] = _hf_where_it_fits(model, device, opts, log)
        del triple, model
        release_memory()
    _ratios(record["rows"])
    for r in record["rows"]:
        if "error" in r:
            log(f"{r['weights']} kv{r['kv_bits']}: failed: {r['error']}")
        else:
            ratio = r["kv_tokens_vs_16bit"]
            log(f"{r['weights']} kv{r['kv_bits']}: {fmt_bytes(r['kv_bytes_per_token'])}/token, "
                f"{r['kv_tokens']} tokens in the cache" + (f" ({ratio:.2f}x the 16-bit cache)" if ratio else ""))
    if out_dir is not None:
        from lowbit.bench.plots import plot_memory, try_plot

        record["json"] = str(write_json(out_dir, "memory", record))
        record["png"] = try_plot(plot_memory, record, out_dir / "memory.png", log)
    return record


def _hf_where_it_fits(model, device: torch.device, opts: MemoryOptions, log) -> dict:
    cfg = model.config
    need = cfg.num_parameters * 2
    if _cuda(device):
        free, _ = torch.cuda.mem_get_info(device)
        if need > HF_FITS_FRACTION * free:
            return {"skipped": f"fp16 weights need {need / 2**30:.1f} GiB; {free / 2**30:.1f} GiB free"}
    try:
        hf = hf_figures(cfg, torch.float16, device, opts.hf_prompt_len)
    except Exception as e:  # transformers missing, or out of memory: the table goes on without it
        hf = {"error": f"{type(e).__name__}: {e}"}
    release_memory()
    if "kv_bytes_per_token" in hf:
        log(f"transformers {hf['transformers']} fp16: weights {fmt_bytes(hf['weights_bytes'])}, "
            f"KV {fmt_bytes(hf['kv_bytes_per_token'])}/token")
    return hf


def _ratios(rows: list[dict]) -> None:
    """kv_tokens_vs_16bit: tokens held relative to the 16-bit cache of the same weights."""
    base = {r["weights"]: r["kv_tokens"] for r in rows if r.get("kv_bits") == 16 and "kv_tokens" in r}
    for r in rows:
        if "kv_tokens" in r and base.get(r["weights"]):
            r["kv_tokens_vs_16bit"] = r["kv_tokens"] / base[r["weights"]]
        elif "kv_tokens" in r:
            r["kv_tokens_vs_16bit"] = None
