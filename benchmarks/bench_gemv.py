"""W4A16 at decode batch sizes on the device: every candidate config of the chosen kernel kinds,
on the projections a Llama decode step runs (q/k/v and gate/up fused, as the engine runs them), at
M = 1 (and the --m given), against tinygemm and cuBLAS fp16 in the same run. Timing as
bench_kernels.py (CUDA graph, rotating weight copies so L2 never holds the next call's weights).

    python3 benchmarks/bench_gemv.py --out $OUT
    python3 benchmarks/bench_gemv.py --m 1,16,64 --kinds gemvh,mmh,mm --out $OUT
    python3 benchmarks/bench_gemv.py --kinds gemvc,gemvh --out $OUT     # the CUDA C++ gemv beside Triton's
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.bench_kernels import copy_bandwidth_gbps, graph_us, rotations, tinygemm_pack, weight_copies  # noqa: E402
from lowbit.kernels import w4a16 as wk  # noqa: E402

SHAPES = [  # (model, layer, K, N)
    ("llama-2-7b", "qkv 4096x12288", 4096, 12288),
    ("llama-2-7b", "o 4096x4096", 4096, 4096),
    ("llama-2-7b", "gate_up 4096x22016", 4096, 22016),
    ("llama-2-7b", "down 11008x4096", 11008, 4096),
    ("llama-3-8b", "qkv 4096x6144", 4096, 6144),
    ("llama-3-8b", "gate_up 4096x28672", 4096, 28672),
    ("llama-3-8b", "down 14336x4096", 14336, 4096),
]
GROUP = 128


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench-gemv-out")
    ap.add_argument("--kinds", default="gemvh,mmh")
    ap.add_argument("--m", default="1", help="comma-separated rows of x (decode batch sizes)")
    args = ap.parse_args()
    kinds = args.kinds.split(",")
    ms = [int(v) for v in args.m.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    copy = copy_bandwidth_gbps()
    print(f"device {torch.cuda.get_device_name()}, copy {copy:.0f} GB/s")
    rows = []
    for model, layer, k, n in SHAPES:
        g = k // GROUP
        codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda")
        scales = torch.rand(n, g, device="cuda") * 0.01 + 0.002
        zeros = torch.randint(0, 16, (n, g), dtype=torch.int32, device="cuda")
        w = wk.pack_w4a16(codes, scales, zeros, GROUP, bits=4)
        gi = torch.arange(k, device="cuda") // GROUP
        w16 = ((codes.float() - zeros[:, gi].float()) * scales[:, gi]).half()
        wp, sz = tinygemm_pack(codes, scales, zeros)
        del codes
        r = rotations(w.nbytes)
        ws = weight_copies(w, r)
        w16s = [w16] + [w16.clone() for _ in range(rotations(w16.numel() * 2) - 1)]
        tgs = [(wp, sz)] + [(wp.clone(), sz.clone()) for _ in range(r - 1)]
        for m in ms:
            rows.append(time_shape(model, layer, k, n, m, w, ws, w16s, tgs, kinds, copy))
        del ws, w16s, tgs, w, w16, wp, sz
        torch.cuda.empty_cache()
    (out / "bench_gemv.json").write_text(json.dumps({"copy_GBps": copy, "device": torch.cuda.get_device_name(),
                                                     "torch": torch.__version__, "rows": rows,
                                                     "time": time.ctime()}, indent=1))


def time_shape(model, layer, k, n, m, w, ws, w16s, tgs, kinds, copy) -> dict:
    """Every candidate config of `kinds` at M = m beside cuBLAS fp16 and tinygemm; prints the best."""
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    ref = F.linear(x, w16s[0]).float()
    row = {"model": model, "layer": layer, "K": k, "N": n, "M": m, "bytes": w.nbytes, "configs": {}}
    for cfg in wk._candidates(m, n, w, x.device, x.dtype):
        if cfg.kind not in kinds:
            continue
        try:
            y = wk.w4a16_matmul(x, w, config=cfg)
            err = float((y.float() - ref).norm() / ref.norm())
            us = graph_us([lambda wi=wi: wk.w4a16_matmul(x, wi, config=cfg) for wi in ws])
        except Exception as exc:  # noqa: BLE001
            row["configs"][repr(cfg)] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
            continue
        row["configs"][repr(cfg)] = {"us": us, "err": err, "kind": cfg.kind}
    row["cublas_us"] = graph_us([lambda wi=wi: F.linear(x, wi) for wi in w16s])
    xb = x.to(torch.bfloat16)
    row["tinygemm_us"] = graph_us([lambda a=a, b=b: torch.ops.aten._weight_int4pack_mm(xb, a, GROUP, b) for a, b in tgs])
    for kind in kinds:
        best = min(((v["us"], c) for c, v in row["configs"].items() if v.get("kind") == kind), default=None)
        row[f"best_{kind}"] = best
    line = (f"{layer:22s} M={m:<3d} {w_mb(row):6.1f} MB  tinygemm {row['tinygemm_us']:6.1f} us  "
            f"cuBLAS {row['cublas_us']:6.1f}")
    for kind in kinds:
        b = row[f"best_{kind}"]
        if b:
            line += f"  {kind} {b[0]:6.1f} us ({row['bytes'] / b[0] / 1e3 / copy * 100:4.1f}% BW)"
    print(line, flush=True)
    for kind in kinds:
        top = sorted((v["us"], v["err"], c) for c, v in row["configs"].items() if v.get("kind") == kind)[:3]
        for us, err, c in top:
            print(f"    {us:6.1f} {c}  rel. err vs cuBLAS {err:.1e}")
    for e in [v["error"] for v in row["configs"].values() if "error" in v][:2]:
        print(f"    error: {e}")
    return row


def w_mb(row) -> float:
    return row["bytes"] / 1e6


if __name__ == "__main__":
    main()
