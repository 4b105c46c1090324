"""Perplexity against bits per weight for mixed precision and uniform GPTQ on the default model, from
benchmarks/results/mixed_sensitivity_default_cpu.json (the runs its "commands" list):

    python3 benchmarks/plot_mixed.py     # -> benchmarks/results/mixed_ppl_vs_bpw.png
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FP32_PPL = 19.921  # the same 10 windows, the fp32 model (README, "Mixed precision")


def main() -> None:
    data = json.loads((RESULTS / "mixed_sensitivity_default_cpu.json").read_text())
    points = {"mixed (sensitivity-weighted)": [], "uniform GPTQ g64": []}
    for name, rec in data["checkpoints"].items():
        if "ppl" in rec and "bpw" in rec:
            points["mixed (sensitivity-weighted)" if name.startswith("mixed") else "uniform GPTQ g64"].append(
                (rec["bpw"], rec["ppl"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in points.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
    ax.axhline(FP32_PPL, color="gray", linestyle="--", label=f"fp32 ({FP32_PPL})")
    ax.set_xlabel("bits per weight of the decoder linears (scales and zeros counted)")
    ax.set_ylabel("WikiText-2 perplexity (10 windows of 2048)")
    ax.set_title("SmolLM2-135M-Instruct: mixed precision vs uniform GPTQ (CPU)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "mixed_ppl_vs_bpw.png", dpi=120)
    print(f"wrote {RESULTS / 'mixed_ppl_vs_bpw.png'}")


if __name__ == "__main__":
    main()
