"""Perplexity in the convention of the GPTQ and AWQ papers' evaluation code.

The eval split is tokenized as one stream (WikiText-2: raw test lines joined with "\\n\\n"), cut
into non-overlapping windows of `seqlen` tokens, the tail shorter than a window dropped; each
window is scored on its own from an empty context, every token but the first predicted.
ppl = exp(total NLL / predicted tokens). Since every window predicts seqlen - 1 tokens, this equals
the papers' exp(mean over windows of the window's mean NLL).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from lowbit.errors import LowbitError


@dataclass
class PerplexityResult:
    dataset: str
    source: str
    seqlen: int
    windows: int
    total_windows: int  # windows the split holds; windows < total_windows under --limit
    tokens_scored: int
    nll: float  # mean negative log-likelihood per scored token (nats)
    ppl: float
    seconds: float
    kv_bits: int = 16  # KV cache the windows attended through (16: none)

    def to_dict(self) -> dict:
        return asdict(self)


def token_windows(token_ids: list[int] | torch.Tensor, seqlen: int, limit: int | None = None) -> torch.Tensor:
    """int64 [n_windows, seqlen]: the stream's non-overlapping windows, the first `limit` of them."""
    if seqlen < 2:
        raise LowbitError(f"--seqlen {seqlen}: a window needs at least 2 tokens")
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    n = ids.numel() // seqlen
    if n == 0:
        raise LowbitError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of --seqlen {seqlen}")
    if limit is not None:
        if limit < 1:
            raise LowbitError(f"--limit {limit}: expected at least 1 window")
        n = min(n, limit)
    return ids[: n * seqlen].view(n, seqlen)


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, device, batch_size: int = 1, progress=None,
               kv_bits: int = 16) -> tuple[float, int]:
    """Summed next-token NLL (float64) over `windows` [n, seqlen] and the number of tokens scored;
    kv_bits 8 / 4: attention through a quantized paged KV cache (eval/kv_forward.py), a window at a time."""
    from lowbit.eval.kv_forward import kv_cache_logits

    total, count = 0.0, 0
    step = batch_size if kv_bits == 16 else 1
    for s in range(0, windows.shape[0], step):
        x = windows[s:s + step].to(device)
        logits = (model(x) if kv_bits == 16 else kv_cache_logits(model, x, kv_bits))[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                reduction="sum")
        total += float(nll)
        count += x[:, 1:].numel()
        if progress is not None:
            progress(x.shape[0], total / count)
    return total, count


def perplexity(model, tokenizer, dataset: str = "wikitext2", seqlen: int = 2048, limit: int | None = None,
               batch_size: int = 1, device=None, show_progress: bool = True, kv_bits: int = 16) -> PerplexityResult:
    """Perplexity of `model` on the eval split of `dataset` (see lowbit.eval.datasets)."""
    from lowbit.eval.datasets import load_text, resolve

    split = resolve(dataset, "eval")
    ids = tokenizer.encode(load_text(dataset, "eval"), add_special_tokens=False)
    windows = token_windows(ids, seqlen, limit)
    total_windows = len(ids) // seqlen
    device = device or next(model.parameters()).device
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=windows.shape[0], desc=f"ppl {dataset} seqlen {seqlen}", unit="win", leave=False)

    def progress(n, mean_nll):
        bar.update(n)
        bar.set_postfix(ppl=f"{math.exp(mean_nll):.3f}")

    t0 = time.time()
    try:
        nll, count = window_nll(model, windows, device, batch_size, progress if bar else None, kv_bits)
    finally:
        if bar is not None:
            bar.close()
    return PerplexityResult(dataset, split.describe(), seqlen, windows.shape[0], total_windows, count,
                            nll / count, math.exp(nll / count), time.time() - t0, kv_bits)
