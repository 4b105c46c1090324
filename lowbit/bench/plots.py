"""PNG figures of the bench records: throughput and per-token latency against concurrency, offline
throughput per configuration, and the memory table. Each takes the JSON records as written."""
from __future__ import annotations

from pathlib import Path


def try_plot(plot, data, path: Path, log=print) -> str | None:
    """plot(data, path) -> the PNG's path; None (and a line in the log) where it cannot be drawn,
    e.g. without matplotlib: the JSON is the result, the figure a view of it."""
    try:
        return str(plot(data, path))
    except Exception as e:
        log(f"{path.name}: no figure ({type(e).__name__}: {e})")
        return None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _title(records: list[dict], what: str) -> str:
    env = next((r["env"] for r in records if "env" in r), {})
    return f"{what} on {env.get('device_name', '?')} (torch {env.get('torch', '?')})"


def generate_series(records: list[dict]) -> list[tuple[str, list[dict]]]:
    """(label, results by concurrency) for every run that produced results."""
    series = []
    for rec in records:
        for run in rec.get("runs", []):
            if run.get("results"):
                label = f"{rec['model']}, KV {'fp16' if run['kv_bits'] == 16 else 'int%d' % run['kv_bits']}"
                series.append((label, run["results"]))
    return series


def plot_generate(records: list[dict], path: Path) -> Path:
    plt = _pyplot()
    fig, (ax_tps, ax_lat) = plt.subplots(1, 2, figsize=(13, 5))
    styles = {"p50": "-", "p90": "--", "p99": ":"}
    for i, (label, results) in enumerate(generate_series(records)):
        color = f"C{i}"
        conc = [r["concurrency"] for r in results]
        ax_tps.plot(conc, [r["output_tokens_per_s"] for r in results], "o-", color=color, label=label)
        for pct, ls in styles.items():
            ax_lat.plot(conc, [r["per_token_latency_ms"][pct] for r in results], ls, marker="o", color=color,
                        label=f"{label} {pct}")
    ticks = sorted({r["concurrency"] for _, results in generate_series(records) for r in results})
    for ax in (ax_tps, ax_lat):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("concurrent requests")
        ax.grid(True, alpha=0.3)
    ax_tps.set_ylabel("output tokens/s")
    ax_tps.set_title("throughput")
    ax_lat.set_ylabel("per-token latency (ms)")
    ax_lat.set_title("per-token latency p50 (solid) / p90 (dashed) / p99 (dotted)")
    ax_tps.legend(fontsize=7)
    ax_lat.legend(fontsize=6, ncol=2)
    fig.suptitle(_title(records, "lowbit bench generate"))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_throughput(records: list[dict], path: Path) -> Path:
    plt = _pyplot()
    fig, (ax_tok, ax_req) = plt.subplots(1, 2, figsize=(11, 4.5))
    ok = [r for r in records if "result" in r]
    labels = [f"{r['model']}\nKV {r['options']['kv_bits']}" for r in ok]
    x = range(len(ok))
    ax_tok.bar([i - 0.2 for i in x], [r["result"]["output_tokens_per_s"] for r in ok], 0.4, label="output")
    ax_tok.bar([i + 0.2 for i in x], [r["result"]["total_tokens_per_s"] for r in ok], 0.4, label="prompt + output")
    ax_tok.set_ylabel("tokens/s")
    ax_tok.legend()
    ax_req.bar(list(x), [r["result"]["requests_per_s"] for r in ok], 0.5, color="C2")
    ax_req.set_ylabel("requests/s")
    for ax in (ax_tok, ax_req):
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, fontsize=7)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(_title(records, "lowbit bench throughput"))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_memory(record: dict, path: Path) -> Path:
    plt = _pyplot()
    fig, (ax_w, ax_kv) = plt.subplots(1, 2, figsize=(12, 4.5))
    weights = [w for w in record.get("weights", []) if "weights_bytes" in w]
    names = [w["weights"] for w in weights]
    if record.get("hf", {}).get("weights_bytes"):
        weights = weights + [{"weights_bytes": record["hf"]["weights_bytes"],
                              "weights_bytes_stored": record["hf"]["weights_bytes"]}]
        names = names + ["transformers fp16"]
    x = range(len(weights))
    biggest = max((w["weights_bytes"] for w in weights), default=0)
    unit, size = ("GiB", 2 ** 30) if biggest >= 2 ** 30 else ("MiB", 2 ** 20)
    ax_w.bar([i - 0.2 for i in x], [w["weights_bytes_stored"] / size for w in weights], 0.4, label="as stored")
    ax_w.bar([i + 0.2 for i in x], [w["weights_bytes"] / size for w in weights], 0.4, label="held (all forms)")
    ax_w.set_xticks(list(x))
    ax_w.set_xticklabels([n.replace(" dummy ", "\n") for n in names], fontsize=7)
    ax_w.set_ylabel(unit)
    ax_w.set_title("weights")
    ax_w.legend()
    rows = [r for r in record.get("rows", []) if "kv_tokens" in r]
    labels = [f"{r['weights'].replace(' dummy ', chr(10))}\nKV {r['kv_dtype']}" for r in rows]
    bars = ax_kv.bar(range(len(rows)), [r["kv_tokens"] for r in rows], color=[f"C{r['kv_bits'] % 7}" for r in rows])
    for bar, r in zip(bars, rows):
        ratio = r.get("kv_tokens_vs_16bit")
        if ratio:
            ax_kv.annotate(f"{ratio:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                           va="bottom", fontsize=8)
    ax_kv.set_xticks(range(len(rows)))
    ax_kv.set_xticklabels(labels, fontsize=6)
    ax_kv.set_ylabel("tokens the KV cache holds")
    ax_kv.set_title("KV cache capacity at the same memory")
    for ax in (ax_w, ax_kv):
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(_title([record], "lowbit bench memory"))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
