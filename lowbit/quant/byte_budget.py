"""A budget in bytes for `quantize mixed --max-bytes`, turned into the bits per weight it optimizes.

"Fit 12 GB with 8k tokens of int8 KV at batch 8" is how a deployment states its budget; the
optimizer (bit_budget.py) spends bits per weight of the decoder linears. Between the two lie what
stays 16-bit (embeddings, the output head when it is not tied, norms, biases: 2 bytes a parameter
as the engine holds them) and the KV cache the engine must still fit (`kv_tokens` tokens at
`kv_bits`, as the paged cache stores them: codes plus their scales). The linears get the rest:
bpw = 8 * (max_bytes - other - kv) / (their weights).
"""
from __future__ import annotations

import re

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.layers.paged_kv_cache import PagedKVCache

_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
          "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}
DENSE_BYTES = 2  # a parameter kept in fp16 / bf16


def parse_size(text: str | int, option: str = "--max-bytes") -> int:
    """'12GB' (10^9), '11.5GiB' (2^30), '90MB', '123456' -> bytes."""
    if isinstance(text, int):
        size = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]I?B|B)?\s*", str(text), re.IGNORECASE)
        if m is None:
            raise LowbitError(f"{option} {text!r}: expected a size such as 12GB, 11.5GiB, 900MB or a number of bytes")
        size = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if size <= 0:
        raise LowbitError(f"{option} {text!r}: must be positive")
    return size


def bpw_for_bytes(net: nn.Module, linear_numel: int, max_bytes: int, kv_tokens: int = 0,
                  kv_bits: int = 16) -> tuple[float, dict]:
    """-> (bits per weight for the decoder linears, the budget's breakdown in bytes)."""
    if kv_bits not in (16, 8, 4):
        raise LowbitError(f"--kv-bits {kv_bits}: expected 16, 8 or 4")
    if kv_tokens < 0:
        raise LowbitError(f"--kv-tokens {kv_tokens}: must be >= 0")
    total = sum(p.numel() for p in net.parameters())  # a tied head is one parameter
    other = (total - linear_numel) * DENSE_BYTES
    cfg = net.config
    kv = kv_tokens * PagedKVCache.bytes_per_token(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
                                                  kv_bits, torch.float16)
    left = max_bytes - other - kv
    breakdown = {"max_bytes": max_bytes, "dense_bytes": other, "kv_bytes": kv, "kv_tokens": kv_tokens,
                 "kv_bits": kv_bits, "linear_bytes": left}
    if left <= 0:
        raise LowbitError(f"--max-bytes {max_bytes}: the 16-bit parameters take {other} bytes and the KV cache "
                          f"({kv_tokens} tokens at {kv_bits} bits) {kv}, which leaves nothing for the {linear_numel} "
                          f"linear weights")
    return 8 * left / linear_numel, breakdown
