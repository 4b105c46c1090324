"""The engine's KV cache: fixed-size blocks shared by all sequences, addressed through block
tables. The model sees the same two calls as `ContiguousKVCache` (`attention`, `advance`); the
model runner primes it with each step's `PagedAttentionMetadata` before the forward.

A step is one packed sequence of tokens (B=1): first the decode tokens, one per sequence,
which attend to their whole context through the paged decode kernel; then prompt chunks, which
attend causally to their earlier pages and to themselves. Both read the keys and values back
from the pages after writing them, so a chunk sees exactly what a later decode will see, also
with int8/int4 KV.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.layers.attention import gqa_attention


@dataclass
class PagedAttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot (block id * block_size + offset) of each new token
    block_tables: torch.Tensor  # [S, max_blocks] int32, padded with 0
    context_lens: torch.Tensor  # [S] int32: tokens in the cache once this step's are written
    num_decode: int  # the first num_decode sequences (and tokens) decode one token each
    query_lens: list[int]  # [S] new tokens per sequence, host side, for the prefill loop
    context_lens_host: list[int]  # [S] the same as context_lens, host side


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 kv_bits: int, dtype: torch.dtype, device: torch.device | str):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.kv_heads, self.head_dim, self.kv_bits = kv_heads, head_dim, kv_bits
        shape = (num_blocks, block_size, kv_heads, head_dim)  # [num_blocks, block_size, kv_heads, head_dim]
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.meta: PagedAttentionMetadata | None = None

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, kv_bits: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8

    def set_metadata(self, meta: PagedAttentionMetadata) -> None:
        self.meta = meta

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [T, kv_heads, head_dim] into the slots of the step's tokens."""
        slots = self.meta.slot_mapping
        self.k[layer].view(-1, self.kv_heads, self.head_dim).index_copy_(0, slots, k.to(self.k[layer].dtype))
        self.v[layer].view(-1, self.kv_heads, self.head_dim).index_copy_(0, slots, v.to(self.v[layer].dtype))

    def gather(self, layer: int, block_table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence's first `length` keys and values -> [kv_heads, length, head_dim] each."""
        nb = -(-length // self.block_size)
        blocks = block_table[:nb].long()

        def pages(cache):
            return cache[blocks].reshape(nb * self.block_size, self.kv_heads, self.head_dim)[:length].transpose(0, 1)

        return pages(self.k[layer]), pages(self.v[layer])

    def decode_attention(self, layer: int, q: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
        """q [S, H, D], one query per sequence at its last position -> [S, H, D]."""
        m = self.meta
        s = q.shape[0]
        out = torch.empty_like(q)
        for i in range(s):
            out[i] = self._attend(layer, q[i:i + 1], i, sliding_window)[:, 0]
        return out

    def _attend(self, layer: int, q: torch.Tensor, i: int, sliding_window: int | None) -> torch.Tensor:
        """q [n, H, D], the last n positions of sequence i -> [H, n, D]."""
        m = self.meta
        k, v = self.gather(layer, m.block_tables[i], m.context_lens_host[i])
        return gqa_attention(q.transpose(0, 1)[None], k[None].to(q.dtype), v[None].to(q.dtype), sliding_window)[0]

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  sliding_window: int | None = None) -> torch.Tensor:
        """q [1, H, T, D] (rotary applied), new k/v [1, KVH, T, D] -> [1, H, T, D]."""
        m = self.meta
        q = q[0].transpose(0, 1)  # [T, H, D]
        self.write(layer, k[0].transpose(0, 1), v[0].transpose(0, 1))
        out = torch.empty_like(q)
        nd = m.num_decode
        if nd:
            out[:nd] = self.decode_attention(layer, q[:nd], sliding_window)
        start = nd
        for i in range(nd, len(m.query_lens)):
            n = m.query_lens[i]
            out[start:start + n] = self._attend(layer, q[start:start + n], i, sliding_window).transpose(0, 1)
            start += n
        return out.transpose(0, 1)[None]

    def advance(self, t: int) -> None:
        """Positions come from the metadata; nothing to count here."""
