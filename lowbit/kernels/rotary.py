"""Rotary position embedding (Su et al. 2021), neox / HF-Llama "rotate half" style, applied in place
to a packed batch's q [T, H, D] and k [T, KVH, D] at positions [T].

cos_sin_cache [max_position, rot_dim] holds cos(pos * inv_freq) in its first rot_dim / 2 columns
and sin in the rest (vLLM's layout; `cos_sin_cache` builds it). Dims i < rot_dim / 2 pair with
i + rot_dim / 2; dims >= rot_dim are left alone (partial rotary). Arithmetic in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels._common import interpreting, next_pow2
from lowbit.kernels.pdl import launch_options, pdl_begin

_TRITON_INTERPRET = interpreting()


@triton.jit
def _rotate_heads(x_ptr, t, stride_t, stride_h, n_heads, cos, sin, HALF,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    h = tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_HALF)
    m = (h < n_heads)[:, None] & (i < HALF)[None, :]
    p1 = x_ptr + t * stride_t + h[:, None] * stride_h + i[None, :]
    x1 = tl.load(p1, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=m, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=m)
    tl.store(p1 + HALF, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=m)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, pos_ptr, cs_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_cs,
                   n_q_heads, n_k_heads, HALF,
                   BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t)
    i = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cs_ptr + pos * stride_cs + i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(q_ptr, t, stride_qt, stride_qh, n_q_heads, cos, sin, HALF, BLOCK_QH, BLOCK_HALF)
    _rotate_heads(k_ptr, t, stride_kt, stride_kh, n_k_heads, cos, sin, HALF, BLOCK_KH, BLOCK_HALF)


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    """Rotates q [T, H, D] and k [T, KVH, D] in place; positions int [T]; cos_sin_cache [P, rot_dim]."""
    t, n_q, d = q.shape
    rot = cos_sin_cache.shape[-1]
    if k.shape[0] != t or k.shape[2] != d or positions.shape != (t,) or rot % 2 or rot > d:
        raise ValueError(f"rotary: q {tuple(q.shape)}, k {tuple(k.shape)}, positions {tuple(positions.shape)} "
                         f"and cos_sin_cache {tuple(cos_sin_cache.shape)} disagree")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("rotary: q, k and cos_sin_cache need a contiguous last dim (the update is in place)")
    if t == 0:
        return
    half = rot // 2
    _rotary_kernel[(t,)](q, k, positions, cos_sin_cache, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                         cos_sin_cache.stride(0), n_q, k.shape[1], half,
                         BLOCK_QH=next_pow2(n_q), BLOCK_KH=next_pow2(k.shape[1]),
                         BLOCK_HALF=max(16, next_pow2(half)), num_warps=4)


@triton.jit
def _rotary_rows_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_ct,
                        stride_st, n_q_heads, n_k_heads, HALF,
                        BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr,
                        USE_PDL: tl.constexpr):
    pdl_begin(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cos_ptr + t * stride_ct + i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + t * stride_st + i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(q_ptr, t, stride_qt, stride_qh, n_q_heads, cos, sin, HALF, BLOCK_QH, BLOCK_HALF)
    _rotate_heads(k_ptr, t, stride_kt, stride_kh, n_k_heads, cos, sin, HALF, BLOCK_KH, BLOCK_HALF)


def rotary_cos_sin(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotates q [T, H, D] and k [T, KVH, D] in place by per-token cos, sin [T, D] in HF's layout
    (emb = cat(freqs, freqs): the first D / 2 columns are read), as the model computes them once a
    step. q and k may be strided views (e.g. into one fused qkv output) with a contiguous last dim."""
    t, n_q, d = q.shape
    if k.shape[0] != t or k.shape[2] != d or cos.shape != (t, d) or sin.shape != (t, d):
        raise ValueError(f"rotary: q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)} and "
                         f"sin {tuple(sin.shape)} disagree")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise ValueError("rotary: q, k, cos and sin need a contiguous last dim (the update is in place)")
    if t == 0:
        return
    half = d // 2
    _rotary_rows_kernel[(t,)](q, k, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
                              sin.stride(0), n_q, k.shape[1], half, BLOCK_QH=next_pow2(n_q),
                              BLOCK_KH=next_pow2(k.shape[1]), BLOCK_HALF=max(16, next_pow2(half)), num_warps=4,
                              **launch_options(q.device))


def cos_sin_cache(inv_freq: torch.Tensor, max_position: int) -> torch.Tensor:
    """fp32 [max_position, 2 * len(inv_freq)]: cos | sin of position * inv_freq."""
    freqs = torch.arange(max_position, dtype=torch.float32, device=inv_freq.device)[:, None] * inv_freq.float()
    return torch.cat([freqs.cos(), freqs.sin()], -1)


def rotary_ref(q, k, positions, cos_sin_cache):
    """Returns rotated copies (fp32 math, in the inputs' dtypes)."""
    rot = cos_sin_cache.shape[-1]
    half = rot // 2
    cs = cos_sin_cache[positions.long()].float()
    cos, sin = cs[:, None, :half], cs[:, None, half:]

    def one(x):
        xf = x.float().clone()
        x1, x2 = xf[..., :half].clone(), xf[..., half:rot].clone()
        xf[..., :half] = x1 * cos - x2 * sin
        xf[..., half:rot] = x2 * cos + x1 * sin
        return xf.to(x.dtype)

    return one(q), one(k)
