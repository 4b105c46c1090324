"""The KV cache the model writes into. The model calls only `attention` (apply the rotary embedding
to the new queries and keys, store the new keys and values, attend over all that is stored) and
`advance`; a paged cache implements the same two."""
from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.layers.attention import gqa_attention
from lowbit.layers.rotary import apply_rotary


class ContiguousKVCache:
    """One preallocated buffer per layer, all sequences of the batch at the same length."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (batch, kv_heads, max_len, head_dim)  # [B, kv_heads, max_len, head_dim]
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.length = 0  # tokens already stored (and visible to the next step)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [B, kv_heads, T, D] for the new tokens; returns all keys/values so far."""
        t = k.shape[2]
        end = self.length + t
        if end > self.max_len:
            raise LowbitError(f"KV cache full: {end} tokens needed, room for {self.max_len}; raise max_len")
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
        """q [B, T, H, D], new k/v [B, T, KVH, D] before the rotary embedding (cos, sin [B, T, D])
        -> attention output [B, T, H, D]."""
        q, k = apply_rotary(q, k, cos, sin)
        k_all, v_all = self.update(layer, k.transpose(1, 2), v.transpose(1, 2))
        return gqa_attention(q.transpose(1, 2), k_all, v_all, sliding_window).transpose(1, 2)

    def advance(self, t: int) -> None:
        self.length += t

    def reset(self) -> None:
        self.length = 0
