"""`lowbit eval report`: what each quantization costs, in one table.

For every checkpoint given (the first is the reference, usually the unquantized model): size on
disk, bits per weight of the decoder's linear layers as stored (codes, scales, zeros and g_idx
over the weights they encode), WikiText-2 perplexity, KL(reference || model) with top-1 agreement
on the same windows (the reference model stays loaded: live logits, no top-k truncation), and the
task accuracies of `lowbit eval tasks`. Writes report.md, report.json and report.png into the output
directory (built in a temporary sibling and renamed), and each checkpoint directory's own results
into its eval_results.json, so a quantized model carries its measured cost with it (`lowbit info`
shows it).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from lowbit.errors import LowbitError

# a decoder linear's tensors, by HF name (GGUF names are mapped to these when read)
_LINEAR = re.compile(r"\.layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.")
_DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8,
               "F8_E4M3": 8, "F8_E5M2": 8, "BOOL": 8}
# the score the harness leads with for each task
HEADLINE = {"hellaswag": "acc_norm", "arc_challenge": "acc_norm", "piqa": "acc_norm", "boolq": "acc", "mmlu": "acc",
            "gsm8k": "acc"}
RESULTS_FILE = "eval_results.json"


@dataclass
class ReportOptions:
    dataset: str = "wikitext2"
    seqlen: int = 2048
    limit: int | None = None  # windows for ppl and KLD
    tasks: list[str] = field(default_factory=list)
    task_limit: int | None = None
    num_fewshot: int | None = None
    batch_size: int = 4
    dtype: str = "auto"
    device: str | None = None


def size_on_disk(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def stored_linear_bits(checkpoint) -> int | None:
    """Bits the checkpoint spends on its decoder linears (every tensor of theirs), read from the file
    headers without loading; None for a checkpoint kind this does not know."""
    from lowbit.loading.gguf_file import GGUFFile
    from lowbit.loading.safetensors_dir import SafetensorsDir

    if isinstance(checkpoint, GGUFFile):
        return sum(int(t.n_bytes) * 8 for name, t in checkpoint._tensors.items() if _LINEAR.search(name))
    if isinstance(checkpoint, SafetensorsDir):
        from safetensors import safe_open

        bits = 0
        by_shard: dict[Path, list[str]] = {}
        for name, shard in checkpoint._index().items():
            if _LINEAR.search(name):
                by_shard.setdefault(shard, []).append(name)
        for shard, names in by_shard.items():
            with safe_open(str(shard), "pt") as f:
                for name in names:
                    sl = f.get_slice(name)
                    bits += math.prod(sl.get_shape()) * _DTYPE_BITS.get(sl.get_dtype(), 32)
        return bits
    return None


def linear_weights(model) -> int:
    """Weights the decoder's linear layers encode (in x out, merged layers counted whole)."""
    from lowbit.layers.linear import QLinear

    return sum(m.in_features * m.out_features for name, m in model.named_modules()
               if isinstance(m, QLinear) and ".layers." in f".{name}.")


def evaluate_checkpoint(name: str, triple, reference, opts: ReportOptions, windows) -> dict:
    """One row of the report (reference: the first checkpoint's model, None for the first itself)."""
    from lowbit.eval.kld import _stats, kld_windows
    from lowbit.eval.ppl import window_nll
    from lowbit.eval.tasks import run_task
    from lowbit.models.default import resolve_model

    model, _, ckpt = triple
    path = resolve_model(name)
    bits = stored_linear_bits(ckpt)
    n_weights = linear_weights(model)
    row = {"checkpoint": name, "path": str(path), "size_bytes": size_on_disk(path),
           "bits_per_weight": bits / n_weights if bits and n_weights else None}
    if reference is None:  # the reference row: its perplexity only
        nll, count = window_nll(model, windows, next(model.parameters()).device, opts.batch_size)
        row["ppl"] = math.exp(nll / count)
    else:
        kl, same, nll_m, nll_r, _ = kld_windows(model, windows, reference)
        stats = _stats(kl, same, nll_m, nll_r)
        row.update(ppl=stats["ppl_model"], kld_mean=stats["kld_mean"], kld_p99=stats["kld_p99"],
                   top1=stats["top1_agreement"])
    row["tasks"] = {}
    for task in opts.tasks:
        d = run_task(triple, task, opts.task_limit, opts.num_fewshot, opts.batch_size).to_dict()
        d.pop("samples", None)
        d.pop("groups", None)
        # one item has no standard error: None (JSON has no NaN)
        row["tasks"][task] = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in d.items()}
    return row


def run_report(checkpoints: list[str], out: Path, opts: ReportOptions, log=print) -> dict:
    from lowbit.atomic_dir import atomic_output_dir
    from lowbit.eval.datasets import load_text, resolve
    from lowbit.eval.ppl import token_windows
    from lowbit.eval.provenance import provenance
    from lowbit.eval.task_data import sha256_file
    from lowbit.eval.tasks import parse_tasks
    from lowbit.loading.loader import load_model
    from lowbit.models.default import resolve_model

    if not checkpoints:
        raise LowbitError("eval report: give at least one checkpoint (the first is the reference)")
    if opts.tasks:
        parse_tasks(",".join(opts.tasks))
    for name in checkpoints:
        if not resolve_model(name).exists():
            raise LowbitError(f"eval report: {name}: not found")
    rows, reference, windows, files = [], None, None, {}
    for i, name in enumerate(checkpoints):
        log(f"[{i + 1}/{len(checkpoints)}] {name}")
        triple = load_model(resolve_model(name), opts.dtype, opts.device)
        if windows is None:  # the reference's tokenizer cuts the windows every model is scored on
            text = load_text(opts.dataset, "eval")
            windows = token_windows(triple[1].encode(text, add_special_tokens=False), opts.seqlen, opts.limit)
            data_path = resolve(opts.dataset, "eval").path
            files[str(data_path)] = sha256_file(Path(data_path))
        row = evaluate_checkpoint(name, triple, reference, opts, windows)
        for t in row["tasks"].values():
            files.update(t.pop("files", {}))
        rows.append(row)
        log("    " + _summary(row))
        if reference is None:
            reference = triple[0]  # kept loaded: the others' KLD against live logits
        else:
            del triple
    device = str(next(reference.parameters()).device)
    meta = provenance(files, device)
    report = {"dataset": opts.dataset, "seqlen": opts.seqlen, "windows": int(windows.shape[0]), "rows": rows, **meta}
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        (tmp / "report.md").write_text(markdown_table(report))
        plot_report(report, tmp / "report.png")
    for row in rows:
        write_results_into(Path(row["path"]), row, report)
    return report


def _summary(row: dict) -> str:
    parts = [f"ppl {row['ppl']:.4f}"]
    if "kld_mean" in row:
        parts.append(f"KLD {row['kld_mean']:.5f}  top-1 {100 * row['top1']:.2f}%")
    parts += [f"{t} {r[HEADLINE[t]]:.4f}" for t, r in row["tasks"].items()]
    return "  ".join(parts)


def markdown_table(report: dict) -> str:
    tasks = list(report["rows"][0]["tasks"])
    head = ["checkpoint", "size MB", "bpw", "ppl", "KLD", "top-1 %"] + [f"{t} ({HEADLINE[t]})" for t in tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["rows"]:
        bpw = f"{r['bits_per_weight']:.2f}" if r["bits_per_weight"] else "-"
        cells = [r["checkpoint"], f"{r['size_bytes'] / 1e6:.1f}", bpw, f"{r['ppl']:.4f}",
                 f"{r['kld_mean']:.5f}" if "kld_mean" in r else "(reference)",
                 f"{100 * r['top1']:.2f}" if "top1" in r else "-"]
        cells += [_score(r["tasks"][t], HEADLINE[t]) for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"\n{report['dataset']}: {report['windows']} windows of {report['seqlen']} tokens; KLD and top-1 against "
            f"the first row. Command: `{report['command']}`\n")
    return "\n".join(lines) + "\n" + note


def _score(result: dict, metric: str) -> str:
    se = result.get(metric + "_stderr")
    return f"{result[metric]:.4f}" + (f" ± {se:.4f}" if se is not None else "")


def plot_report(report: dict, path: Path) -> None:
    """Perplexity against bits per weight, one labelled point per checkpoint."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the JSON and the table are the result; the figure is a view of them
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in report["rows"]:
        x = r["bits_per_weight"] or 0.0
        ax.scatter([x], [r["ppl"]])
        ax.annotate(Path(r["checkpoint"]).name, (x, r["ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("bits per weight (decoder linears, as stored)")
    ax.set_ylabel(f"{report['dataset']} perplexity")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results_into(path: Path, row: dict, report: dict) -> None:
    """The checkpoint's own row, with the report's provenance, as <checkpoint>/eval_results.json
    (directories only: a single-file checkpoint such as the embedded GGUF is left as it is)."""
    if not path.is_dir():
        return
    data = {"results": row, "dataset": report["dataset"], "seqlen": report["seqlen"], "windows": report["windows"],
            "reference": report["rows"][0]["checkpoint"],
            **{k: report[k] for k in ("command", "data_sha256", "versions", "device", "finished_at") if k in report}}
    tmp = path / f".{RESULTS_FILE}.tmp"
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path / RESULTS_FILE)
