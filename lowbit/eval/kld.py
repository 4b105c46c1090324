"""`lowbit eval kld`: per-token KL(reference || model) over the windows `eval ppl` scores, with the
statistics llama.cpp's perplexity --kl-divergence prints (mean ± stderr, median, percentiles,
max, same-top-1 fraction) and both models' perplexities.

Each window is scored from an empty context and every position but the last predicts the next
token (ppl.py's convention). The reference is a loaded model or a file of its top-k log-probs
(logit_store.py); from a file, the KL is that of the two distributions coarsened to the stored
top-k tokens + one bucket for the rest: a lower bound of the full KL (data-processing inequality)
whose gap is the KL inside the tail (tests/test_eval_kld.py checks that identity). The gap is not
small for a 135M model, whose distributions keep much mass outside the top k: RTN w4 g64 of the
default model, 2 windows of 512, live mean KL 0.390; saved k = 64 gives 0.306 (reference tail mass
16%), k = 256 0.345, k = 1024 0.372. Raise --top-k where the bound must be tight.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from lowbit.errors import LowbitError

TOKEN_CHUNK = 512  # positions per log_softmax, to bound the [positions, vocab] float64 temporaries


@dataclass
class KLDResult:
    dataset: str
    source: str
    seqlen: int
    windows: int
    tokens: int
    kld_mean: float
    kld_stderr: float
    kld_median: float
    kld_p90: float
    kld_p95: float
    kld_p99: float
    kld_max: float
    top1_agreement: float
    top1_stderr: float
    ppl_model: float
    ppl_reference: float
    reference: str  # the reference model as named, or the saved-logits file
    top_k: int | None  # k of the saved reference (None: full distributions)
    seconds: float
    kv_bits: int = 16  # KV cache the model attended through (16: none; the reference never does)

    def to_dict(self) -> dict:
        return asdict(self)


def kl_full(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """[n] KL(ref || model) from full log-prob rows [n, vocab]."""
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1)


def kl_topk(ref_top_logp: torch.Tensor, ref_top_idx: torch.Tensor, ref_rest_logp: torch.Tensor,
            logp: torch.Tensor) -> torch.Tensor:
    """[n] KL between the reference and the model coarsened to the reference's top-k + the rest.
    ref_top_logp/idx [n, k], ref_rest_logp [n] (log of the reference mass outside the top k),
    logp [n, vocab] the model's full log-probs."""
    p_top = ref_top_logp.exp()
    q_top_logp = logp.gather(1, ref_top_idx)
    kl = (p_top * (ref_top_logp - q_top_logp)).sum(-1)
    # the rest bucket: p_rest * log(p_rest / q_rest), q_rest = 1 - sum of the model's top-k mass
    q_rest = (1 - q_top_logp.exp().sum(-1)).clamp_min(1e-30)
    p_rest = ref_rest_logp.exp()
    return kl + torch.where(p_rest > 0, p_rest * (ref_rest_logp - q_rest.log()), torch.zeros_like(p_rest))


def top_k_rows(logp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top-k log-probs [n, k] descending, their token ids [n, k], log of the remaining mass [n])."""
    top, idx = logp.topk(k, dim=-1)
    # the rest's log-mass taken directly (log1p(-sum(top)) would lose it when the top k hold ~all mass)
    rest = torch.logsumexp(logp.scatter(1, idx, -math.inf), dim=-1)
    return top, idx, rest


def _stats(kl: np.ndarray, same: np.ndarray, nll_model: float, nll_ref: float) -> dict:
    n = kl.size
    return {"tokens": n, "kld_mean": float(kl.mean()),
            "kld_stderr": float(kl.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
            "kld_median": float(np.median(kl)), "kld_p90": float(np.percentile(kl, 90)),
            "kld_p95": float(np.percentile(kl, 95)), "kld_p99": float(np.percentile(kl, 99)),
            "kld_max": float(kl.max()), "top1_agreement": float(same.mean()),
            "top1_stderr": float(same.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
            "ppl_model": math.exp(nll_model / n), "ppl_reference": math.exp(nll_ref / n)}


@torch.no_grad()
def kld_windows(model, windows: torch.Tensor, reference=None, saved=None, save_k: int | None = None,
                device=None, progress=None, kv_bits: int = 16):
    """Per-token KL(reference || model) and top-1 agreement over windows [n, seqlen].
    reference: a loaded model, or saved: a logit_store.SavedLogits. With save_k, also returns the
    reference's top-k rows (for logit_store.save). Returns (kl [tokens] float64, same [tokens] bool,
    nll_model, nll_ref, saved_rows or None). kv_bits 8 / 4: the model (not the reference) attends
    through a quantized paged KV cache (eval/kv_forward.py)."""
    from lowbit.eval.kv_forward import kv_cache_logits

    device = device or next(model.parameters()).device
    kls, sames, rows = [], [], []
    nll_m = nll_r = 0.0
    for w in range(windows.shape[0]):
        x = windows[w:w + 1].to(device)
        targets = x[0, 1:]
        logits = (model(x) if kv_bits == 16 else kv_cache_logits(model, x, kv_bits))[0, :-1]  # [seqlen - 1, vocab]
        ref_logits = reference(windows[w:w + 1].to(next(reference.parameters()).device))[0, :-1].to(device) \
            if reference is not None else None
        if ref_logits is not None and ref_logits.shape[-1] != logits.shape[-1]:
            raise LowbitError(f"the reference's vocabulary has {ref_logits.shape[-1]} tokens, the model's "
                              f"{logits.shape[-1]}: KL divergence needs the same tokenizer (compare a model with "
                              f"its own unquantized original)")
        if saved is not None and w == 0 and int(saved.top_idx.max()) >= logits.shape[-1]:
            raise LowbitError(f"{saved.path}: saved token ids reach {int(saved.top_idx.max())}, beyond the model's "
                              f"vocabulary of {logits.shape[-1]}: it was saved from a model with another tokenizer")
        for s in range(0, targets.numel(), TOKEN_CHUNK):
            sl = slice(s, s + TOKEN_CHUNK)
            logp = torch.log_softmax(logits[sl].double(), -1)
            t = targets[sl]
            nll_m -= float(logp.gather(1, t[:, None]).sum())
            if ref_logits is not None:
                ref_logp = torch.log_softmax(ref_logits[sl].double(), -1)
                kls.append(kl_full(ref_logp, logp).cpu())
                sames.append((ref_logp.argmax(-1) == logp.argmax(-1)).cpu())
                nll_r -= float(ref_logp.gather(1, t[:, None]).sum())
                if save_k:
                    top, idx, rest = top_k_rows(ref_logp, save_k)
                    rows.append((top.float().cpu(), idx.cpu(), rest.float().cpu(),
                                 ref_logp.gather(1, t[:, None])[:, 0].float().cpu()))
            else:
                top, idx, rest, tok_logp = saved.rows(w, sl)
                top, idx, rest = top.to(device).double(), idx.to(device).long(), rest.to(device).double()
                kls.append(kl_topk(top, idx, rest, logp).cpu())
                sames.append((idx[:, 0] == logp.argmax(-1)).cpu())
                nll_r -= float(tok_logp.double().sum())
        if progress is not None:
            progress(1)
    kl = torch.cat(kls).numpy()
    same = torch.cat(sames).numpy()
    return kl, same, nll_m, nll_r, (rows if save_k else None)


def kl_divergence(model, tokenizer, reference=None, saved=None, dataset: str = "wikitext2", seqlen: int = 2048,
                  limit: int | None = None, save_logits=None, save_k: int = 64, device=None,
                  show_progress: bool = True, meta: dict | None = None, kv_bits: int = 16) -> KLDResult:
    """KL(reference || model) on `dataset`'s eval windows; reference is a model or a saved file
    (lowbit.eval.logit_store.load), whose own windows are then used."""
    from lowbit.eval.datasets import load_text, resolve
    from lowbit.eval.logit_store import save
    from lowbit.eval.ppl import token_windows

    if saved is not None:
        windows, dataset, source = saved.windows, saved.meta["dataset"], saved.meta["source"]
        if limit is not None:
            windows = windows[:limit]
        seqlen = windows.shape[1]
    else:
        source = resolve(dataset, "eval").describe()
        windows = token_windows(tokenizer.encode(load_text(dataset, "eval"), add_special_tokens=False), seqlen, limit)
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=windows.shape[0], desc=f"kld {dataset} seqlen {seqlen}", unit="win", leave=False)
    t0 = time.time()
    try:
        kl, same, nll_m, nll_r, rows = kld_windows(model, windows, reference, saved,
                                                   save_k if save_logits else None, device,
                                                   bar.update if bar else None, kv_bits)
    finally:
        if bar is not None:
            bar.close()
    if save_logits and rows is not None:
        save(save_logits, windows, rows, dict(meta or {}, dataset=dataset, source=source, seqlen=seqlen, k=save_k))
    st = _stats(kl, same, nll_m, nll_r)
    return KLDResult(dataset, source, seqlen, windows.shape[0], reference=(meta or {}).get("reference", "model") if saved is None else str(saved.path),
                     top_k=None if saved is None else saved.k, seconds=time.time() - t0, kv_bits=kv_bits, **st)
