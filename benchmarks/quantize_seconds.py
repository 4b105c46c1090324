"""Wall time of `lowbit.quantize` for each method on the default model (what tests/test_quantize.py
used to print from its fixtures; timings are a measurement, not a test).

    python benchmarks/quantize_seconds.py [--device cpu|cuda] [--calib-samples 2 --calib-seqlen 128]

Prints one JSON object: seconds of calibration + quantization (not loading or saving) per method,
with the device, torch version and thread count it ran with.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lowbit.quant.api import METHODS, quantize  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--w-bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--calib-samples", type=int, default=2)
    ap.add_argument("--calib-seqlen", type=int, default=128)
    args = ap.parse_args()
    seconds = {}
    for method in args.methods.split(","):
        res = quantize("default", method, None, w_bits=args.w_bits, group_size=args.group_size,
                       calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen, device=args.device, log=None)
        seconds[method] = round(res.seconds, 2)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    print(json.dumps({"seconds": seconds, "device": device, "torch": torch.__version__, **vars(args)}))


if __name__ == "__main__":
    main()
