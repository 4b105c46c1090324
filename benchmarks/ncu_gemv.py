"""A driver for Nsight Compute: the CUDA C++ W4A16 gemv on the Llama-2-7B decode shapes, with the
configs the engine's tuner picked on the device, a few calls each, nothing else on the GPU; with
--m > 1 the tensor-core kernel (csrc/w4a16_mma.cu) at that decode batch instead. Profile it on the device:

    ncu --clock-control none -k regex:w4a16_gemv --launch-skip 1 --launch-skip-before-match 0 \
        --set full -o $OUT/gemv python3 benchmarks/ncu_gemv.py
    ncu --clock-control none -k regex:w4a16_mma --set full -o $OUT/mma python3 benchmarks/ncu_gemv.py --m 16
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lowbit.kernels import cuda_ext  # noqa: E402
from lowbit.kernels import w4a16 as wk  # noqa: E402

# layer: (K, N, warps, columns a lane, blocks in flight a warp, K split[, cp.async stages]): the
# H200's register-ring picks at batch 1, and cp.async configs of the same shapes
CONFIGS = {
    "qkv": (4096, 12288, 8, 1, 2, 1),
    "o": (4096, 4096, 8, 1, 4, 1),
    "gate_up": (4096, 22016, 4, 2, 2, 1),
    "down": (11008, 4096, 16, 1, 4, 1),
    "gate_up_async": (4096, 22016, 4, 4, 1, 1, 2),
    "down_async": (11008, 4096, 8, 2, 1, 2, 2),
}
# the tensor-core kernel at M > 1: (K, N, warps, blocks in flight a warp, K split)
MMA_CONFIGS = {  # the tuner's mmc candidates of 8 warps, 2 blocks in flight, on the H200
    "qkv": (4096, 12288, 8, 2, 5),
    "gate_up": (4096, 22016, 8, 2, 3),
    "down": (11008, 4096, 8, 2, 16),
}


def packed(k: int, n: int):
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda")
    scales = torch.rand(n, k // 128, device="cuda") * 0.01 + 0.002
    zeros = torch.randint(0, 16, (n, k // 128), dtype=torch.int32, device="cuda")
    return wk.pack_w4a16(codes, scales, zeros, 128, bits=4)


def run_mma(mod, m: int, calls: int) -> None:
    for name, (k, n, warps, depth, split) in MMA_CONFIGS.items():
        w = packed(k, n)
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        out = torch.empty(m, n, device="cuda", dtype=torch.float16)
        ws = torch.empty(split, m, n, device="cuda", dtype=torch.float32)
        for _ in range(calls):
            mod.w4a16_mma(x, w.qweight_int32_kxn, w.scales_gxn, w.zeros_gxn, out, ws, w.locks, k,
                          w.group_planes, split, warps, depth, False)
        torch.cuda.synchronize()
        print(f"{name}: M {m} K {k} N {n} <{warps} warps, {depth} in flight> split {split}, {w.nbytes / 1e6:.1f} MB")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default=",".join(CONFIGS))
    ap.add_argument("--calls", type=int, default=2)
    ap.add_argument("--m", type=int, default=1, help="rows of x; > 1 profiles the tensor-core kernel")
    args = ap.parse_args()
    mod = cuda_ext.w4a16_module()
    if args.m > 1:
        run_mma(mod, args.m, args.calls)
        return
    for name in args.layers.split(","):
        k, n, warps, cols, depth, split, *rest = CONFIGS[name]
        stages = rest[0] if rest else 0  # csrc's kStages: 0 = the register-ring kernel
        w = packed(k, n)
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        out = torch.empty(n, device="cuda", dtype=torch.float16)
        ws = torch.empty(split, n, device="cuda", dtype=torch.float32)
        for _ in range(args.calls):
            mod.w4a16_gemv(x, w.qweight_int32_kxn, w.scales_gxn, w.zeros_gxn, out, ws, w.locks, k,
                           w.group_planes, split, warps, cols, depth, stages, False, False)
        torch.cuda.synchronize()
        print(f"{name}: K {k} N {n} <{warps}, {cols}, {depth}, {stages}> split {split}, {w.nbytes / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
