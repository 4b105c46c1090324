"""Grouped-query attention on top of the KV cache, through PyTorch's SDPA."""
from __future__ import annotations

import torch
from torch.nn import functional as F


def attention_mask(q_len: int, kv_len: int, sliding_window: int | None, device) -> torch.Tensor | None:
    """Boolean [q_len, kv_len] mask (True = may attend) for queries that are the last q_len
    positions of kv_len; None where SDPA's own causal flag is exact."""
    if q_len == 1 and (sliding_window is None or kv_len <= sliding_window):
        return None
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    return mask


def gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, KVH, S, D] with the queries at the last T positions; -> [B, H, T, D]."""
    t, s = q.shape[2], k.shape[2]
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        # each KV head serves `groups` query heads; SDPA's enable_gqa is not on every backend.
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    if t == s and (sliding_window is None or s <= sliding_window):
        return F.scaled_dot_product_attention(q, k, v, is_causal=t > 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask(t, s, sliding_window, q.device))
