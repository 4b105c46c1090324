"""How close can a 4-bit KV cache come to the 16-bit one on the default model? A study of
quantization schemes (issue 11's int4 KV target: top-1 agreement >= 95%), run on the CPU.

Each scheme fake-quantizes keys and values (quantize, then dequantize: the arithmetic of a stored
cache without its layout) as the paged cache would store them, after the rotary embedding, and the
model attends through a 16-bit paged cache holding those values (eval/kv_forward.py's path with its
own attention). KL divergence and top-1 agreement against the same model without a cache, per
token, over the first --windows x --seqlen tokens of WikiText-2 test (as `lowbit eval kld`).

Schemes: per token and KV head over groups of `g` head dims (the shipped int4 format is g = head_dim,
asymmetric with a midpoint zero, kernels/kv_quant.py), with or without the Hadamard basis the cache
uses for int4 (layers/paged_kv_cache.py); keys per channel over groups of 16 consecutive tokens
(KIVI, Liu et al. 2024); a static per-channel smoothing of keys (k / s, q * s) from the keys' own
maxima on the evaluated text (an optimistic bound for calibration).

    .venv/bin/python benchmarks/kv4_schemes.py --out benchmarks/results/kv4_schemes_cpu.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lowbit.eval.datasets import load_text  # noqa: E402
from lowbit.eval.kv_forward import BLOCK_SIZE  # noqa: E402
from lowbit.eval.ppl import token_windows  # noqa: E402
from lowbit.kernels.kv_quant import dequantize_kv_ref, quantize_kv_ref  # noqa: E402
from lowbit.layers.paged_kv_cache import PagedAttentionMetadata, PagedKVCache, hadamard  # noqa: E402
from lowbit.layers.rotary import apply_rotary  # noqa: E402


def fake_per_token(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """The shipped format's arithmetic (kernels/kv_quant.py's reference, asymmetric with a midpoint
    zero) over groups of `group` of the last dim: quantized, then dequantized."""
    shp = x.shape
    grouped = x.reshape(*shp[:-1], shp[-1] // group, group)
    return dequantize_kv_ref(*quantize_kv_ref(grouped, bits), bits).reshape(shp).to(x.dtype)


def fake_per_channel(x: torch.Tensor, bits: int, tokens: int) -> torch.Tensor:
    """x [T, heads, D]: each channel over groups of `tokens` consecutive tokens (the last group is
    padded with its last token)."""
    t = x.shape[0]
    pad = (-t) % tokens
    xp = torch.cat([x, x[-1:].expand(pad, *x.shape[1:])]) if pad else x
    grouped = xp.reshape(-1, tokens, *x.shape[1:]).transpose(1, -1)  # [T / tokens, D, heads, tokens]
    return fake_per_token(grouped, bits, tokens).transpose(1, -1).reshape(-1, *x.shape[1:])[:t]


class SchemeCache(PagedKVCache):
    """A 16-bit paged cache whose attention stores the scheme's fake-quantized keys and values."""

    def __init__(self, *args, scheme: dict, smooth: torch.Tensor | None, stats: torch.Tensor | None, **kw):
        super().__init__(*args, **kw)
        self.scheme, self.smooth, self.stats = scheme, smooth, stats
        self.basis = hadamard(self.head_dim) if scheme["rotate"] else None

    def attention(self, layer, q, k, v, cos, sin, sliding_window=None):
        q, k = apply_rotary(q, k, cos, sin)
        q, k, v = q[0], k[0], v[0]
        if self.stats is not None:
            self.stats[layer] = torch.maximum(self.stats[layer], k.abs().amax(0).float())
        if self.smooth is not None:  # q.k unchanged: k / s, q * s per channel
            s = self.smooth[layer]
            k = k / s
            q = q * s.repeat_interleave(q.shape[1] // k.shape[1], 0)
        if self.basis is not None:
            q, k, v = q @ self.basis, k @ self.basis, v @ self.basis
        sc = self.scheme
        if sc["k_bits"] < 16:
            k = (fake_per_channel(k, sc["k_bits"], sc["k_tokens"]) if sc.get("k_tokens")
                 else fake_per_token(k, sc["k_bits"], sc["k_group"] or k.shape[-1]))
        if sc["v_bits"] < 16:
            v = fake_per_token(v, sc["v_bits"], sc["v_group"] or v.shape[-1])
        self.write(layer, k, v)
        out = self.prefill_attention(layer, q, sliding_window)
        if self.basis is not None:
            out = out @ self.basis
        return out[None]


def logits_through(model, x, scheme, smooth=None, stats=None):
    cfg = model.config
    t = x.shape[1]
    blocks = -(-t // BLOCK_SIZE)
    cache = SchemeCache(cfg.num_hidden_layers, blocks, BLOCK_SIZE, cfg.num_key_value_heads, cfg.head_dim, 16,
                        model.model.embed_tokens.weight.dtype, x.device, scheme=scheme, smooth=smooth, stats=stats)
    cache.set_metadata(PagedAttentionMetadata(
        slot_mapping=torch.arange(t), block_tables=torch.arange(blocks, dtype=torch.int32)[None],
        context_lens=torch.tensor([t], dtype=torch.int32), num_decode=0, query_lens=[t], context_lens_host=[t],
        prefill_cu_seqlens_q=None))
    return model(x, positions=torch.arange(t)[None], cache=cache)


def score(model, windows, refs, scheme, smooth=None, stats=None) -> dict:
    kls, same = [], []
    for x, ref in zip(windows, refs):
        logp = torch.log_softmax(logits_through(model, x[None], scheme, smooth, stats)[0, :-1].double(), -1)
        kls.append((ref.exp() * (ref - logp)).sum(-1))
        same.append(ref.argmax(-1) == logp.argmax(-1))
    kl, agree = torch.cat(kls), torch.cat(same).double()
    return {"kld_mean": float(kl.mean()), "kld_p99": float(kl.quantile(0.99)), "top1": float(agree.mean()),
            "top1_stderr": float(agree.std() / agree.numel() ** 0.5)}


SCHEMES = [  # name, scheme
    ("16-bit cache (noise floor)", dict(k_bits=16, v_bits=16, rotate=False)),
    ("int4 K+V, per token, no rotation", dict(k_bits=4, v_bits=4, k_group=None, v_group=None, rotate=False)),
    ("int4 K+V, per token, Hadamard (shipped)", dict(k_bits=4, v_bits=4, k_group=None, v_group=None, rotate=True)),
    ("int4 K+V, per token, groups of 16 dims, Hadamard",
     dict(k_bits=4, v_bits=4, k_group=16, v_group=16, rotate=True)),
    ("int4 K+V, per token, groups of 8 dims, Hadamard", dict(k_bits=4, v_bits=4, k_group=8, v_group=8, rotate=True)),
    ("int4 V only (K 16-bit), Hadamard", dict(k_bits=16, v_bits=4, v_group=None, rotate=True)),
    ("int4 K only (V 16-bit), Hadamard", dict(k_bits=4, v_bits=16, k_group=None, rotate=True)),
    ("int4 K per channel / 16 tokens, V per token, no rotation",
     dict(k_bits=4, v_bits=4, k_tokens=16, v_group=None, rotate=False)),
    ("int4 K per channel / 16 tokens, V per token, Hadamard",
     dict(k_bits=4, v_bits=4, k_tokens=16, v_group=None, rotate=True)),
    ("int4 K per channel / 16 tokens, V groups of 16 dims, Hadamard",
     dict(k_bits=4, v_bits=4, k_tokens=16, v_group=16, rotate=True)),
]


def main() -> None:
    from lowbit.cli import _load

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path("kv4_schemes.json"))
    args = ap.parse_args()
    t0 = time.time()
    model, tok, _ = _load(args.model, "fp32", "cpu")
    windows = token_windows(tok.encode(load_text("wikitext2", "eval"), add_special_tokens=False), args.seqlen,
                            args.windows)
    with torch.no_grad():
        refs = [torch.log_softmax(model(x[None])[0, :-1].double(), -1) for x in windows]
        rows = []
        for name, scheme in SCHEMES:
            rows.append({"scheme": name, **scheme, **score(model, windows, refs, scheme)})
            print(f"{name:62s} KLD {rows[-1]['kld_mean']:.4f}  top-1 {100 * rows[-1]['top1']:.2f}%", flush=True)
        cfg = model.config
        stats = torch.zeros(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
        score(model, windows, refs, dict(k_bits=16, v_bits=16, rotate=False), stats=stats)
        smooth = stats.clamp(min=1e-3) ** 0.5
        smooth = smooth / smooth.mean(-1, keepdim=True)
        name = "int4 K+V, per token, Hadamard, keys smoothed (s = max|k|^0.5 on the same text)"
        scheme = dict(k_bits=4, v_bits=4, k_group=None, v_group=None, rotate=True)
        rows.append({"scheme": name, **scheme, "smooth_alpha": 0.5, **score(model, windows, refs, scheme, smooth)})
        print(f"{name:62s} KLD {rows[-1]['kld_mean']:.4f}  top-1 {100 * rows[-1]['top1']:.2f}%", flush=True)
    args.out.write_text(json.dumps({
        "command": "benchmarks/kv4_schemes.py " + " ".join(sys.argv[1:]), "model": args.model,
        "tokens": args.windows * (args.seqlen - 1), "torch": torch.__version__, "seconds": time.time() - t0,
        "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
