"""GPU kernel benchmark (device only): W4A16 matmul on Llama-2-7B / Llama-3-8B shapes against cuBLAS
fp16 and PyTorch's tinygemm int4 kernel, and paged decode attention (fp16/int8/int4 KV) against
F.scaled_dot_product_attention on an unpaged fp16 cache. Writes a JSON and prints markdown tables.

    python benchmarks/bench_kernels.py --out benchmarks/results/kernels_h100.json [--sweep] [--quick]

Timing: each op is captured in a CUDA graph (no CPU launch overhead, as the engine's decode runs)
as 20+ back-to-back calls that rotate over enough copies of the weights / KV cache (>= 150 MB, at
least 2) that L2 (50 MB) never holds the next call's data; replays are timed with CUDA events and
the median of 5 replays is reported per call. Bandwidth is bytes that must move (weights incl.
scales/zeros; KV codes incl. scale/zero) over time, compared with a device-to-device copy measured
in the same run (bytes read + written).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from lowbit.kernels import _common  # noqa: E402
from lowbit.kernels import paged_attention as pa  # noqa: E402
from lowbit.kernels.w4a16 import pack_w4a16, tune_key, w4a16_matmul  # noqa: E402

W4A16_SHAPES = [  # (model, layer, K, N)
    ("llama-2-7b", "qkv/o 4096x4096", 4096, 4096),
    ("llama-2-7b", "gate/up 4096x11008", 4096, 11008),
    ("llama-2-7b", "down 11008x4096", 11008, 4096),
    ("llama-2-7b", "lm_head 4096x32000", 4096, 32000),
    ("llama-3-8b", "qkv 4096x6144", 4096, 6144),
    ("llama-3-8b", "gate_up 4096x28672", 4096, 28672),
    ("llama-3-8b", "down 14336x4096", 14336, 4096),
    ("llama-3-8b", "lm_head 4096x128256", 4096, 128256),
]
MS = (1, 4, 16, 64, 256, 2048)
GROUP = 128


def bench_ms(fn, rep=60):
    return do_bench(fn, warmup=10, rep=rep, return_mode="median")


def rotations(nbytes: int) -> int:
    """Copies of an operand so that consecutive calls never find theirs in L2."""
    if nbytes >= 500e6:
        return 1 if nbytes >= 4e9 else 2
    return max(2, min(16, math.ceil(150e6 / nbytes)))


def weight_copies(w, n: int) -> list:
    """w and n - 1 copies of its tensors (their own split-K counters), so that rotating calls over
    them never finds the next call's weight in L2."""
    return [w] + [dataclasses.replace(w, qweight_int32_kxn=w.qweight_int32_kxn.clone(), scales_gxn=w.scales_gxn.clone(),
                                      zeros_gxn=w.zeros_gxn.clone(), locks=torch.zeros_like(w.locks))
                  for _ in range(n - 1)]


def graph_us(calls, reps=None) -> float:
    return 1e3 * _common.graph_time_ms(calls, reps=reps or max(20, len(calls)))


def copy_bandwidth_gbps() -> float:
    a = torch.empty(512 * 1024 * 1024, dtype=torch.float16, device="cuda").normal_()  # 1 GiB
    b = torch.empty_like(a)
    ms = bench_ms(lambda: b.copy_(a), rep=200)
    gbps = 2 * a.numel() * a.element_size() / ms / 1e6
    del a, b
    return gbps


def tinygemm_pack(codes, scales, zeros):
    """PyTorch's int4 tinygemm format: uint8 [N, K/2] (even column in the high nibble) repacked by
    _convert_weight_to_int4pack, and bf16 scale/zero [K/G, N, 2] with w = (q - 8) * s + z."""
    packed = ((codes[:, ::2] << 4) | codes[:, 1::2]).contiguous()
    wp = torch.ops.aten._convert_weight_to_int4pack(packed, 8)  # inner_k_tiles = 8
    s = scales.float()
    z = (8 - zeros.float()) * s  # (q - zero) * s = (q - 8) * s + (8 - zero) * s
    sz = torch.stack([s, z], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return wp, sz


def bench_w4a16(ms, shapes, log, deadline):
    rows = []
    for model, layer, k, n in shapes:
        if time.time() > deadline:
            log(f"w4a16: out of time before {layer}")
            break
        g = k // GROUP
        codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda")
        scales = (torch.rand(n, g, device="cuda") * 0.01 + 0.002)
        zeros = torch.randint(0, 16, (n, g), dtype=torch.int32, device="cuda")
        w = pack_w4a16(codes, scales, zeros, GROUP, bits=4)
        gi = torch.arange(k, device="cuda") // GROUP
        w_fp16 = ((codes.float() - zeros[:, gi].float()) * scales[:, gi]).half()  # the same weight, dense
        tg_err = None
        try:
            wp, sz = tinygemm_pack(codes, scales, zeros)
        except Exception as exc:  # noqa: BLE001 - recorded, not fatal
            tg_err = f"{type(exc).__name__}: {exc}"[:300]
        del codes
        r = rotations(w.nbytes)
        ws = weight_copies(w, r)
        w16s = [w_fp16] + [w_fp16.clone() for _ in range(rotations(w_fp16.numel() * 2) - 1)]
        tgs = [] if tg_err else [(wp, sz)] + [(wp.clone(), sz.clone()) for _ in range(rotations(w.nbytes) - 1)]
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            row = {"model": model, "layer": layer, "K": k, "N": n, "M": m, "group": GROUP,
                   "weight_bytes": w.nbytes, "copies": r}
            try:
                y = w4a16_matmul(x, w)  # tunes this shape bucket once
                ref = F.linear(x, w_fp16)
                row["rel_err_vs_dense"] = float((y.float() - ref.float()).norm() / ref.float().norm())
                row["config"] = repr(_common._TUNED.get(tune_key(m, w, x.dtype)))
                row["ours_us"] = graph_us([lambda wi=wi: w4a16_matmul(x, wi) for wi in ws])
            except Exception as exc:  # noqa: BLE001
                row["ours_error"] = f"{type(exc).__name__}: {exc}"[:300]
            row["cublas_fp16_us"] = graph_us([lambda wi=wi: F.linear(x, wi) for wi in w16s])
            if tg_err is None:
                xb = x.to(torch.bfloat16)
                try:
                    ref = F.linear(x, w_fp16).float()
                    y = torch.ops.aten._weight_int4pack_mm(xb, wp, GROUP, sz)
                    row["tinygemm_rel_err_vs_dense"] = float((y.float() - ref).norm() / ref.norm())
                    row["tinygemm_us"] = graph_us([lambda a=a, b=b: torch.ops.aten._weight_int4pack_mm(xb, a, GROUP, b)
                                                   for a, b in tgs])
                except Exception as exc:  # noqa: BLE001
                    row["tinygemm_error"] = f"{type(exc).__name__}: {exc}"[:300]
            else:
                row["tinygemm_error"] = tg_err
            if "ours_us" in row:
                row["ours_GBps"] = w.nbytes / row["ours_us"] / 1e3
                row["flops_T"] = 2 * m * n * k / row["ours_us"] / 1e6
            rows.append(row)
            log(json.dumps(row))
        del ws, w16s, tgs
        del w, w_fp16
        if tg_err is None:
            del wp, sz
        torch.cuda.empty_cache()
    return rows


def make_kv(kv_bits, n_blocks, bs, kvh, d):
    if kv_bits == 16:
        kc = torch.randn(n_blocks, bs, kvh, d, device="cuda", dtype=torch.float16)
        return kc, torch.randn_like(kc), None, None
    dc = d if kv_bits == 8 else d // 2
    kc = torch.randint(0, 256, (n_blocks, bs, kvh, dc), dtype=torch.uint8, device="cuda")
    vc = torch.randint(0, 256, (n_blocks, bs, kvh, dc), dtype=torch.uint8, device="cuda")
    sz = torch.empty(2, n_blocks, bs, kvh, 2, device="cuda", dtype=torch.float16)
    sz[..., 0].uniform_(0.005, 0.02)
    sz[..., 1].normal_(0, 0.1)
    return kc, vc, sz[0], sz[1]


def decode_calls(q, tables, lens, ctx, kv_bits, n_blocks, bs, kvh, d, config=None):
    """Closures over enough cache copies for graph timing, and the bytes one call must read."""
    first = make_kv(kv_bits, n_blocks, bs, kvh, d)
    nbytes = sum(t.numel() * t.element_size() for t in first if t is not None)
    caches = [first] + [make_kv(kv_bits, n_blocks, bs, kvh, d) for _ in range(rotations(nbytes) - 1)]
    calls = [lambda c=c: pa.paged_decode_attention(q, c[0], c[1], tables, lens, kv_bits=kv_bits, k_scale_zero=c[2],
                                                   v_scale_zero=c[3], max_context_len=ctx, config=config)
             for c in caches]
    return calls, nbytes, caches


def bench_decode(batches, ctxs, head_cfgs, log, deadline, d=128, bs=16, limit_bytes=40e9):
    rows = []
    for h, kvh in head_cfgs:
        for b in batches:
            for ctx in ctxs:
                fp16_bytes = b * ctx * kvh * d * 2 * 2
                row = {"heads": h, "kv_heads": kvh, "head_dim": d, "batch": b, "ctx": ctx, "block_size": bs}
                if 2 * fp16_bytes > limit_bytes:  # the paged fp16 cache plus SDPA's contiguous one
                    row["skipped"] = f"{2 * fp16_bytes / 1e9:.0f} GB of cache"
                    rows.append(row)
                    continue
                if time.time() > deadline:
                    row["skipped"] = "out of time"
                    rows.append(row)
                    continue
                reps = 20 if fp16_bytes < 1e9 else 4
                n_blocks = b * ctx // bs
                tables = torch.randperm(n_blocks, device="cuda").to(torch.int32).view(b, ctx // bs)
                lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
                q = torch.randn(b, h, d, device="cuda", dtype=torch.float16)
                for kv_bits in (16, 8, 4):
                    try:
                        calls, nbytes, caches = decode_calls(q, tables, lens, ctx, kv_bits, n_blocks, bs, kvh, d)
                        us = graph_us(calls, reps=max(reps, len(calls)))
                        row[f"kv{kv_bits}_us"] = us
                        row[f"kv{kv_bits}_GBps"] = nbytes / us / 1e3
                        del calls, caches
                    except Exception as exc:  # noqa: BLE001
                        row[f"kv{kv_bits}_error"] = f"{type(exc).__name__}: {exc}"[:300]
                    torch.cuda.empty_cache()
                try:
                    kvs = [(torch.randn(b, kvh, ctx, d, device="cuda", dtype=torch.float16),
                            torch.randn(b, kvh, ctx, d, device="cuda", dtype=torch.float16))
                           for _ in range(rotations(fp16_bytes))]
                    q4 = q.view(b, h, 1, d)
                    sdpa = [lambda k=k, v=v: F.scaled_dot_product_attention(q4, k, v, enable_gqa=h != kvh)
                            for k, v in kvs]
                    row["sdpa_fp16_us"] = graph_us(sdpa, reps=max(reps, len(sdpa)))
                    if ctx <= 2048:  # same numbers through our kernel on a page table over this cache
                        k, v = kvs[0]
                        ref = sdpa[0]()
                        kc = k.transpose(1, 2).reshape(n_blocks, bs, kvh, d)
                        vc = v.transpose(1, 2).reshape(n_blocks, bs, kvh, d)
                        ident = torch.arange(n_blocks, device="cuda", dtype=torch.int32).view(b, ctx // bs)
                        ours = pa.paged_decode_attention(q, kc, vc, ident, lens)
                        row["rel_err_vs_sdpa"] = float((ours.float() - ref.view(b, h, d).float()).norm()
                                                       / ref.float().norm())
                        del kc, vc
                    del kvs
                except Exception as exc:  # noqa: BLE001
                    row["sdpa_error"] = f"{type(exc).__name__}: {exc}"[:300]
                torch.cuda.empty_cache()
                rows.append(row)
                log(json.dumps(row))
    return rows


def sweep_decode(log, deadline, d=128, bs=16):
    """Tile configs of the decode kernel on a few cases (picks DEFAULT_CONFIG)."""
    cfgs = [dict(BLOCK_N=64, num_warps=4, num_stages=2), dict(BLOCK_N=128, num_warps=4, num_stages=2),
            dict(BLOCK_N=32, num_warps=4, num_stages=3), dict(BLOCK_N=64, num_warps=8, num_stages=2),
            dict(BLOCK_N=128, num_warps=8, num_stages=3), dict(BLOCK_N=64, num_warps=4, num_stages=3),
            dict(BLOCK_N=32, num_warps=2, num_stages=3)]
    rows = []
    for h, kvh, b, ctx in ((32, 8, 32, 8192), (32, 32, 32, 8192), (32, 32, 1, 32768)):
        n_blocks = b * ctx // bs
        tables = torch.randperm(n_blocks, device="cuda").to(torch.int32).view(b, ctx // bs)
        lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
        q = torch.randn(b, h, d, device="cuda", dtype=torch.float16)
        for kv_bits in (16, 8, 4):
            for cfg in cfgs:
                if time.time() > deadline:
                    break
                row = {"heads": h, "kv_heads": kvh, "batch": b, "ctx": ctx, "kv_bits": kv_bits, **cfg}
                try:
                    calls, nbytes, caches = decode_calls(q, tables, lens, ctx, kv_bits, n_blocks, bs, kvh, d, cfg)
                    row["us"] = graph_us(calls, reps=max(4, len(calls)))
                    row["GBps"] = nbytes / row["us"] / 1e3
                    del calls, caches
                except Exception as exc:  # noqa: BLE001
                    row["error"] = f"{type(exc).__name__}: {exc}"[:200]
                rows.append(row)
                log(json.dumps(row))
            torch.cuda.empty_cache()
    return rows


def fmt(v, nd=1):
    return "-" if v is None else f"{v:.{nd}f}"


def w4a16_table(rows, copy_gbps):
    out = ["| shape (K x N) | M | ours us | GB/s | % copy BW | cuBLAS fp16 us | tinygemm us | vs tinygemm | vs cuBLAS |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ours, cub, tg = r.get("ours_us"), r.get("cublas_fp16_us"), r.get("tinygemm_us")
        gbps = r.get("ours_GBps")
        out.append(f"| {r['model']} {r['K']}x{r['N']} | {r['M']} | {fmt(ours)} | {fmt(gbps, 0)} | "
                   f"{fmt(None if gbps is None else 100 * gbps / copy_gbps, 0)} | {fmt(cub)} | {fmt(tg)} | "
                   f"{fmt(None if not (ours and tg) else tg / ours, 2)}x | "
                   f"{fmt(None if not (ours and cub) else cub / ours, 2)}x |")
    return "\n".join(out)


def decode_table(rows):
    out = ["| heads/kv | batch | ctx | fp16 KV us | int8 KV us | int4 KV us | SDPA fp16 us | fp16 GB/s | int8 GB/s |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            out.append(f"| {r['heads']}/{r['kv_heads']} | {r['batch']} | {r['ctx']} | skipped: {r['skipped']} |||||")
            continue
        out.append(f"| {r['heads']}/{r['kv_heads']} | {r['batch']} | {r['ctx']} | {fmt(r.get('kv16_us'))} | "
                   f"{fmt(r.get('kv8_us'))} | {fmt(r.get('kv4_us'))} | {fmt(r.get('sdpa_fp16_us'))} | "
                   f"{fmt(r.get('kv16_GBps'), 0)} | {fmt(r.get('kv8_GBps'), 0)} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/kernels_device.json")
    ap.add_argument("--quick", action="store_true", help="fewer shapes (a smoke run)")
    ap.add_argument("--sweep", action="store_true", help="also sweep decode tile configs")
    ap.add_argument("--budget-s", type=float, default=280, help="stop starting new cases after this")
    ap.add_argument("--sections", default="w4a16,decode")
    args = ap.parse_args()
    t0 = time.time()
    deadline = t0 + args.budget_s
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    log_lines = []

    def log(s):
        print(s, flush=True)
        log_lines.append(s)

    props = torch.cuda.get_device_properties(0)
    res = {"device": torch.cuda.get_device_name(0), "sms": props.multi_processor_count,
           "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
           "command": "python " + " ".join(sys.argv), "autotune": os.environ.get("LOWBIT_AUTOTUNE", "1")}
    res["copy_GBps"] = copy_bandwidth_gbps()
    log(f"{res['device']}: copy {res['copy_GBps']:.0f} GB/s (read + write)")

    def save():
        res["tune_log"] = _common.TUNE_LOG
        res["elapsed_s"] = time.time() - t0
        out_path.write_text(json.dumps(res, indent=1))

    sections = args.sections.split(",")
    if "w4a16" in sections:
        shapes = W4A16_SHAPES[:2] if args.quick else W4A16_SHAPES
        res["w4a16"] = bench_w4a16((1, 16, 2048) if args.quick else MS, shapes, log, deadline)
        save()
    if args.sweep:
        res["decode_sweep"] = sweep_decode(log, deadline)
        save()
    if "decode" in sections:
        res["decode"] = bench_decode((1, 32) if args.quick else (1, 8, 32, 64),
                                     (2048, 8192) if args.quick else (512, 2048, 8192, 32768),
                                     ((32, 32), (32, 8)), log, deadline + 120)
        save()
    print()
    print(f"Device: {res['device']} ({res['sms']} SMs), torch {res['torch']}, triton {res['triton']}; "
          f"copy bandwidth {res['copy_GBps']:.0f} GB/s")
    if res.get("w4a16"):
        print(w4a16_table(res["w4a16"], res["copy_GBps"]))
    if res.get("decode"):
        print()
        print(decode_table(res["decode"]))
    if res.get("decode_sweep"):
        best = {}
        for r in res["decode_sweep"]:
            if "us" in r:
                key = (r["heads"], r["kv_heads"], r["batch"], r["ctx"], r["kv_bits"])
                if key not in best or r["us"] < best[key]["us"]:
                    best[key] = r
        print("\ndecode sweep best:", json.dumps(list(best.values())))
    save()


if __name__ == "__main__":
    main()
