"""Accuracy of RTN / AWQ / GPTQ on the default model (SmolLM2-135M-Instruct): WikiText-2 raw test
perplexity over non-overlapping windows of 2048 tokens, the GPTQ/AWQ papers' protocol.

    python benchmarks/accuracy_table.py [--model PATH] [--device cuda] [--limit N]

Writes benchmarks/results/accuracy_smollm2.json and ppl_vs_bits.png. Resumable: results so far are
kept in --state and configurations already there are skipped (so the run can be split into parts).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lowbit.eval.ppl import perplexity  # noqa: E402
from lowbit.loading.loader import load_model  # noqa: E402
from lowbit.models.default import resolve_model  # noqa: E402
from lowbit.quant.api import quantize  # noqa: E402

CONFIGS = [(b, g) for b, g in [(4, 64), (4, 32), (3, 64)]]
METHODS = ["rtn", "awq", "gptq"]


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.suffix == ".safetensors")


def estimated_bytes(model, qweights, bits: int, group_size: int, fmt: str) -> int:
    """Safetensors payload if export is absent: packed codes and zeros, fp16 scales, (gptq) g_idx,
    and every other tensor in fp16."""
    total = 0
    for name, qw in qweights.items():
        out_f, in_f = qw.codes.shape
        n_groups = qw.scales.shape[1]
        total += out_f * in_f * bits // 8 + out_f * n_groups * 2 + out_f * n_groups * bits // 8
        if fmt == "gptq":
            total += in_f * 4
    quantized = {f"{n}.weight" for n in qweights}
    total += sum(t.numel() * 2 for n, t in model.state_dict().items() if n not in quantized)
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N windows")
    ap.add_argument("--eval-dtype", default=None, help="fp16 on cuda, fp32 on cpu unless given")
    ap.add_argument("--batch-size", type=int, default=1, help="eval windows per forward")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--state", type=Path, default=ROOT / "work-dirs" / "accuracy_state.json")
    ap.add_argument("--work-dir", type=Path, default=ROOT / "work-dirs" / "accuracy")
    ap.add_argument("--only", nargs="*", default=None, help="e.g. fp rtn-w4g64 awq-w3g64")
    args = ap.parse_args()

    state = json.loads(args.state.read_text()) if args.state.exists() else {}
    dev = torch.device(args.device)
    eval_dtype = args.eval_dtype or ("fp16" if dev.type == "cuda" else "fp32")
    model_path = resolve_model(args.model)
    _, tok, _ = load_model(model_path, "fp32", "cpu")
    have_export = (ROOT / "lowbit" / "quant" / "export.py").exists()
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({os.cpu_count()} cores)"

    def save_state():
        args.state.parent.mkdir(parents=True, exist_ok=True)
        args.state.write_text(json.dumps(state, indent=1))

    jobs = ["fp"] + [f"{m}-w{b}g{g}" for b, g in CONFIGS for m in METHODS]
    for key in jobs:
        if key in state or (args.only and key not in args.only):
            continue
        t0 = time.time()
        if key == "fp":
            model, _, _ = load_model(model_path, eval_dtype, dev)
            row = {"method": "fp", "bits": 16, "group_size": None, "quant_seconds": 0.0,
                   "disk_bytes": sum(t.numel() * 2 for t in model.state_dict().values()), "disk_exact": False}
        else:
            method, rest = key.split("-")
            bits, group = int(rest[1]), int(rest.split("g")[1])
            fmt = "gptq" if (method == "gptq" or bits != 4) else "awq"
            wd = args.work_dir / key
            res = quantize(str(model_path), method, wd if have_export else None, w_bits=bits, group_size=group,
                           calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen, device=str(dev),
                           act_order=method == "gptq", static_groups=True, fmt=fmt, overwrite=True,
                           log=lambda line, k=key: print(f"[{k}] {line}", flush=True))
            model = res.model.to(dev)
            if have_export:
                # score the checkpoint as written (packed codes, fp16 scales), read back by our loader
                del model
                model, _, _ = load_model(wd, eval_dtype, dev)
                disk, exact = dir_bytes(wd), True
            else:
                disk, exact = estimated_bytes(model, res.qweights, bits, group, fmt), False
            row = {"method": method, "bits": bits, "group_size": group, "format": fmt,
                   "quant_seconds": round(res.seconds, 1), "disk_bytes": disk, "disk_exact": exact,
                   "mean_layer_error": sum(res.layer_errors) / len(res.layer_errors) if res.layer_errors else None,
                   "options": res.options}
        t1 = time.time()
        res = perplexity(model, tok, "wikitext2", args.seqlen, args.limit, args.batch_size, dev, show_progress=False)
        ppl, n_windows = res.ppl, res.windows
        row.update(ppl=ppl, windows=n_windows, eval_seconds=round(time.time() - t1, 1),
                   total_seconds=round(time.time() - t0, 1), device=device_name)
        print(f"{key}: ppl {ppl:.3f} over {n_windows} windows; quant {row['quant_seconds']}s, eval "
              f"{row['eval_seconds']}s", flush=True)
        state[key] = row
        save_state()
        del model
        if have_export and key != "fp":
            shutil.rmtree(args.work_dir / key, ignore_errors=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    write_results(state, args)


def bits_per_weight(row) -> float:
    """codes + fp16 scale + packed zero point per group, per weight of the quantized linears."""
    if row["method"] == "fp":
        return 16.0
    return row["bits"] + (16 + row["bits"]) / row["group_size"]


def write_results(state: dict, args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    fp = state.get("fp", {}).get("ppl")
    rows = []
    for key, r in state.items():
        r = dict(r, key=key, bits_per_weight=round(bits_per_weight(r), 3))
        if fp:
            r["delta_ppl"] = r["ppl"] - fp
        rows.append(r)
    summary = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1/Q8_0 weights, dequantized: the 'fp' row)",
               "eval": f"WikiText-2 raw test, non-overlapping windows of {args.seqlen} tokens",
               "limit_windows": args.limit,
               "calibration": f"wikitext2 validation (tokenized variant), {args.calib_samples} x {args.calib_seqlen} "
                              f"tokens, seed 0", "rows": rows}
    for b, g in CONFIGS:
        rtn, key = state.get(f"rtn-w{b}g{g}"), f"w{b}g{g}"
        if fp and rtn:
            for m in ("awq", "gptq"):
                r = state.get(f"{m}-w{b}g{g}")
                if r:
                    summary.setdefault("recovered_fraction_of_rtn_loss", {})[f"{m}-{key}"] = round(
                        1 - (r["ppl"] - fp) / (rtn["ppl"] - fp), 3)
    (args.out / "accuracy_smollm2.json").write_text(json.dumps(summary, indent=1))
    plot(rows, fp, args.out / "ppl_vs_bits.png")


def plot(rows, fp, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for m, marker in (("rtn", "o"), ("awq", "s"), ("gptq", "^")):
        pts = sorted((r["bits_per_weight"], r["ppl"], f"w{r['bits']}g{r['group_size']}") for r in rows
                     if r["method"] == m)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=m.upper())
            for x, y, lab in pts:
                ax.annotate(lab, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if fp:
        ax.axhline(fp, color="gray", linestyle="--", label=f"fp ({fp:.2f})")
    ax.set_xlabel("bits per weight (codes + fp16 scale + zero per group)")
    ax.set_ylabel("WikiText-2 perplexity (lower is better)")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M-Instruct: perplexity vs bits per weight")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
