"""W8A8 int8 on the device (issue 12): our Triton int8 GEMM (kernels/w8a8.py), alone and with the
per-token activation quantization a layer runs before it, against cuBLAS fp16 (F.linear), cuBLAS
int8 (torch._int_mm, int32 out, no epilogue) and cuBLAS fp8 (torch._scaled_mm, e4m3, per-token and
per-channel scales) in the same run, on the projections of Llama-2-7B and Llama-3-8B (q/k/v and
gate/up fused, as the engine runs them), for M from decode batches to prefill. Timing: CUDA graph
replays (kernels/_common.graph_time_ms), weights rotated so L2 never holds the next call's.

    python3 benchmarks/bench_w8a8.py --out $OUT
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

from benchmarks.bench_gemv import SHAPES  # noqa: E402
from benchmarks.bench_kernels import graph_us, rotations  # noqa: E402
from lowbit.bench.common import environment  # noqa: E402
from lowbit.kernels.w8a8 import int8_gemm, quantize_rows, w8a8_int8_matmul  # noqa: E402

MS = (1, 16, 64, 256, 1024, 2048, 4096)


def _rotated(make, nbytes: int) -> list:
    return [make() for _ in range(rotations(nbytes))]


def _fp8_scaled_mm():
    """torch._scaled_mm with row-wise scales, or None where this torch / GPU has none."""
    try:
        a = torch.randn(16, 64, device="cuda").to(torch.float8_e4m3fn)
        b = torch.randn(32, 64, device="cuda").to(torch.float8_e4m3fn)
        torch._scaled_mm(a, b.t(), torch.ones(16, 1, device="cuda"), torch.ones(1, 32, device="cuda"),
                         out_dtype=torch.float16)
        return torch._scaled_mm
    except Exception as e:  # noqa: BLE001 - recorded, not fatal
        print(f"fp8 _scaled_mm unavailable: {type(e).__name__}: {e}")
        return None


def case(m: int, k: int, n: int, scaled_mm) -> dict:
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    w16 = _rotated(lambda: torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02, n * k * 2)
    w8 = _rotated(lambda: torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8), n * k)
    ws = torch.rand(n, device="cuda") * 1e-3
    q, s = quantize_rows(x)
    row = {"m": m, "k": k, "n": n}
    row["fp16_us"] = graph_us([lambda w=w: F.linear(x, w) for w in w16])
    row["int8_gemm_us"] = graph_us([lambda w=w: int8_gemm(q, w, s, ws, None, torch.float16) for w in w8])
    row["w8a8_layer_us"] = graph_us([lambda w=w: w8a8_int8_matmul(x, w, ws, None) for w in w8])
    row["quantize_rows_us"] = graph_us([lambda: quantize_rows(x)])
    if m > 16:  # cuBLAS int8 wants M > 16
        row["cublas_int8_us"] = graph_us([lambda w=w: torch._int_mm(q, w.t()) for w in w8])
    if scaled_mm is not None:
        x8 = x.to(torch.float8_e4m3fn)
        w8f = _rotated(lambda: (torch.randn(n, k, device="cuda") * 0.5).to(torch.float8_e4m3fn), n * k)
        sa, sb = torch.ones(m, 1, device="cuda"), torch.ones(1, n, device="cuda")
        row["cublas_fp8_us"] = graph_us([lambda w=w: scaled_mm(x8, w.t(), sa, sb, out_dtype=torch.float16)
                                         for w in w8f])
    for key in ("int8_gemm_us", "w8a8_layer_us", "cublas_int8_us", "cublas_fp8_us"):
        if key in row:
            row[key.replace("_us", "_vs_fp16")] = row["fp16_us"] / row[key]
    del w16, w8
    torch.cuda.empty_cache()
    return row


def table(rows: list[dict]) -> str:
    out = ["| shape | M | cuBLAS fp16 us | int8 GEMM us | W8A8 layer us (quant + GEMM) | cuBLAS int8 us | cuBLAS fp8 us "
           "| int8 GEMM / fp16 | layer / fp16 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def f(key):
            return f"{r[key]:.1f}" if key in r else "-"
        out.append(f"| {r['model']} {r['layer']} | {r['m']} | {f('fp16_us')} | {f('int8_gemm_us')} | {f('w8a8_layer_us')} "
                   f"| {f('cublas_int8_us')} | {f('cublas_fp8_us')} | {r['int8_gemm_vs_fp16']:.2f}x "
                   f"| {r['w8a8_layer_vs_fp16']:.2f}x |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench-w8a8-out")
    ap.add_argument("--m", default=",".join(map(str, MS)), help="comma-separated M (tokens a call)")
    ap.add_argument("--budget-s", type=float, default=240, help="stop starting cases after this many seconds")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scaled_mm = _fp8_scaled_mm()
    rows, t0 = [], time.perf_counter()
    for model, layer, k, n in SHAPES:
        for m in map(int, args.m.split(",")):
            if time.perf_counter() - t0 > args.budget_s:
                print(f"budget reached: {model} {layer} M={m} and after not run")
                break
            r = {"model": model, "layer": layer, **case(m, k, n, scaled_mm)}
            rows.append(r)
            print(json.dumps({key: round(v, 2) if isinstance(v, float) else v for key, v in r.items()}), flush=True)
    rec = {"command": " ".join(sys.argv), "env": environment(torch.device("cuda")), "rows": rows}
    (out / "bench_w8a8.json").write_text(json.dumps(rec, indent=1))
    (out / "bench_w8a8.md").write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
