"""Reading the engine's paged KV cache: a tile of tokens gathered through the block table (Triton),
and the same gather in plain PyTorch for the references.

Cache layout (per layer, K and V alike): [num_blocks, block_size, kv_heads, head_dim] in fp16/bf16,
or for kv_bits 8/4 uint8 codes [num_blocks, block_size, kv_heads, packed_head_dim] with fp16
scale_zero [num_blocks, block_size, kv_heads, 2]; the format is lowbit/kernels/kv_quant.py's.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels._common import interpreting
from lowbit.kernels.kv_quant import dequantize_kv_ref, packed_head_dim

_TRITON_INTERPRET = interpreting()
KV_BITS_ALL = (16, 8, 4)


@triton.jit
def codes_minus(c, OFF: tl.constexpr):
    """uint8 codes -> fp32 (code - OFF), without the int->float unit (quarter rate on Hopper):
    2**23 + code as float bits, then one exact subtraction."""
    return (c.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFF)


@triton.jit
def load_kv_tile(c_ptr, sz_ptr, tok_off, sz_off, tmask, D,
                 KV_BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """[BLOCK_N, BLOCK_D] values of BLOCK_N gathered tokens of one KV head (fp32 when quantized,
    the cache dtype otherwise). tok_off / sz_off [BLOCK_N] int64: element offset of each token's
    (block, slot, head) row in the cache / scale_zero tensor. Masked tokens and dims >= D come
    back finite (codes 0, scale 0), so they vanish against a zero q or p."""
    # one return at the end: Triton compiles what follows a return inside a constexpr branch
    offs_d = tl.arange(0, BLOCK_D)
    if KV_BITS == 16:
        x = tl.load(c_ptr + tok_off[:, None] + offs_d[None, :],
                    mask=tmask[:, None] & (offs_d < D)[None, :], other=0.0)
    else:
        scale = tl.load(sz_ptr + sz_off, mask=tmask, other=0.0).to(tl.float32)
        zero = tl.load(sz_ptr + sz_off + 1, mask=tmask, other=0.0).to(tl.float32)
        if KV_BITS == 8:
            c = tl.load(c_ptr + tok_off[:, None] + offs_d[None, :],
                        mask=tmask[:, None] & (offs_d < D)[None, :], other=0)
            f = codes_minus(c, 128.0)
        else:  # two codes a byte, dim 2i in the low nibble
            offs_h = tl.arange(0, BLOCK_D // 2)
            c = tl.load(c_ptr + tok_off[:, None] + offs_h[None, :],
                        mask=tmask[:, None] & (offs_h < D // 2)[None, :], other=0)
            f = codes_minus(tl.reshape(tl.join(c & 0xF, c >> 4), (BLOCK_N, BLOCK_D)), 8.0)
        x = f * scale[:, None] + zero[:, None]
    return x


def check_cache(k_cache, v_cache, kv_bits, k_scale_zero, v_scale_zero, head_dim: int, where: str):
    """Shapes and dtypes of one layer's cache; returns (block_size, kv_heads)."""
    if kv_bits not in KV_BITS_ALL:
        raise ValueError(f"{where}: kv_bits {kv_bits}: expected one of {KV_BITS_ALL}")
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError(f"{where}: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must match")
    if k_cache.dim() != 4 or k_cache.stride(-1) != 1:
        raise ValueError(f"{where}: caches must be [num_blocks, block_size, kv_heads, dim] with dim contiguous")
    want = head_dim if kv_bits == 16 else packed_head_dim(head_dim, kv_bits)
    if k_cache.shape[-1] != want:
        raise ValueError(f"{where}: cache last dim {k_cache.shape[-1]}, expected {want} for head_dim {head_dim} "
                         f"at kv_bits {kv_bits}")
    if kv_bits != 16:
        if k_cache.dtype != torch.uint8:
            raise ValueError(f"{where}: kv_bits {kv_bits} needs uint8 codes, got {k_cache.dtype}")
        if kv_bits == 4 and head_dim % 2:
            raise ValueError(f"{where}: int4 KV needs an even head_dim, got {head_dim}")
        for name, sz in (("k_scale_zero", k_scale_zero), ("v_scale_zero", v_scale_zero)):
            if sz is None or sz.shape != (*k_cache.shape[:3], 2) or sz.stride(-1) != 1:
                raise ValueError(f"{where}: kv_bits {kv_bits} needs {name} [{', '.join(map(str, k_cache.shape[:3]))}, 2]")
        if k_scale_zero.stride() != v_scale_zero.stride():
            raise ValueError(f"{where}: k_scale_zero and v_scale_zero must have the same strides")
    return k_cache.shape[1], k_cache.shape[2]


def sz_strides(k_scale_zero, kv_bits):
    return (0, 0, 0) if kv_bits == 16 else k_scale_zero.stride()[:3]


def gather_kv_ref(cache: torch.Tensor, scale_zero: torch.Tensor | None, block_row: torch.Tensor, n_tokens: int,
                  kv_bits: int) -> torch.Tensor:
    """fp32 [n_tokens, kv_heads, head_dim]: a sequence's first n_tokens from its pages."""
    bs = cache.shape[1]
    blocks = block_row[: triton.cdiv(n_tokens, bs)].long()
    x = cache[blocks].flatten(0, 1)[:n_tokens]
    if kv_bits == 16:
        return x.float()
    return dequantize_kv_ref(x, scale_zero[blocks].flatten(0, 1)[:n_tokens], kv_bits)
