"""Writing new tokens' K and V into the paged cache (fp16/bf16 copy, or int8/int4 quantization),
optionally applying the rotary embedding on the way: q rotated in place and k rotated as it is
stored, in the one launch (a decode step's rotary kernel was 1.8 us a layer on the H200's batch-1
chain, the write 1.1 us: two launches where one does both).

Quantization is lowbit/kernels/kv_quant.py's format and reproduces `quantize_kv_ref` bit for bit:
fp32 min/max, correctly rounded divisions (tl.div_rn, as torch divides), scale and zero rounded to
fp16 before the codes are computed, and round-half-to-even codes (torch.round).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels._common import interpreting, next_pow2
from lowbit.kernels.kv_quant import quantize_kv_ref
from lowbit.kernels.kv_tile import check_cache, sz_strides
from lowbit.kernels.pdl import launch_options, pdl_begin
from lowbit.kernels.rotary import _rotate_heads

_TRITON_INTERPRET = interpreting()


@triton.jit
def _round_half_even(v):
    # adding 1.5 * 2**23 leaves no fraction bits, so the fp32 add rounds to nearest even (|v| < 2**22)
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _codes(x, scale, zero, KV_BITS: tl.constexpr):
    q = _round_half_even(tl.div_rn(x - zero, scale)) + (1 << (KV_BITS - 1))
    return tl.minimum(tl.maximum(q, 0.0), (1 << KV_BITS) - 1.0).to(tl.uint8)


@triton.jit
def _load_dims(x_ptr, d, m, cos_ptr, sin_ptr, HALF, ROPE: tl.constexpr):
    """x[d] in fp32; with ROPE rotated HF's "rotate half" way, x[d] cos[d] -+ x[d +- HALF] sin[d]
    (cos / sin rows hold each frequency twice), and rounded to x's dtype as the separate rotary
    kernel stores it, so that the cache receives the same values (and codes) either way."""
    x = tl.load(x_ptr + d, mask=m, other=0.0).to(tl.float32)
    if ROPE:
        lo = d < HALF
        partner = tl.load(x_ptr + tl.where(lo, d + HALF, d - HALF), mask=m, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + d, mask=m, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + d, mask=m, other=0.0).to(tl.float32)
        x = (x * c + tl.where(lo, -partner, partner) * s).to(x_ptr.dtype.element_ty).to(tl.float32)
    return x


@triton.jit
def _store_token(x_ptr, c_ptr, sz_ptr, c_off, sz_off, D, cos_ptr, sin_ptr, HALF,
                 KV_BITS: tl.constexpr, BLOCK_D: tl.constexpr, ROPE: tl.constexpr):
    if KV_BITS == 16:
        d = tl.arange(0, BLOCK_D)
        x = _load_dims(x_ptr, d, d < D, cos_ptr, sin_ptr, HALF, ROPE)
        tl.store(c_ptr + c_off + d, x.to(c_ptr.dtype.element_ty), mask=d < D)
    else:
        # even and odd dims apart: int4 stores them as the low and high nibble of one byte
        i = tl.arange(0, BLOCK_D // 2)
        m = 2 * i < D
        xe = _load_dims(x_ptr, 2 * i, m, cos_ptr, sin_ptr, HALF, ROPE)
        xo = _load_dims(x_ptr, 2 * i + 1, m, cos_ptr, sin_ptr, HALF, ROPE)
        lo = tl.minimum(tl.min(tl.where(m, xe, float("inf")), 0), tl.min(tl.where(m, xo, float("inf")), 0))
        hi = tl.maximum(tl.max(tl.where(m, xe, -float("inf")), 0), tl.max(tl.where(m, xo, -float("inf")), 0))
        scale = tl.maximum(tl.div_rn(hi - lo, (1 << KV_BITS) - 1.0), 1e-6).to(tl.float16)
        zero = ((lo + hi) * 0.5).to(tl.float16)
        s32 = scale.to(tl.float32)
        z32 = zero.to(tl.float32)
        ce = _codes(xe, s32, z32, KV_BITS)
        co = _codes(xo, s32, z32, KV_BITS)
        if KV_BITS == 8:
            tl.store(c_ptr + c_off + 2 * i, ce, mask=m)
            tl.store(c_ptr + c_off + 2 * i + 1, co, mask=m)
        else:
            tl.store(c_ptr + c_off + i, ce | (co << 4), mask=m)
        tl.store(sz_ptr + sz_off, scale)
        tl.store(sz_ptr + sz_off + 1, zero)


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, ksz_ptr, vsz_ptr, slot_ptr, q_ptr, cos_ptr, sin_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_cb, stride_ct, stride_ch, stride_zb, stride_zt, stride_zh,
                     stride_qt, stride_qh, stride_cost, stride_sint, D, BLOCK_SIZE, GROUP,
                     KV_BITS: tl.constexpr, BLOCK_D: tl.constexpr, ROPE: tl.constexpr, BLOCK_G: tl.constexpr,
                     USE_PDL: tl.constexpr):
    pdl_begin(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    half = D // 2
    cos_t = cos_ptr + t * stride_cost
    sin_t = sin_ptr + t * stride_sint
    if ROPE:  # this KV head's GROUP query heads, in place (padding tokens too: their rows are unread)
        i = tl.arange(0, BLOCK_D // 2)
        cos = tl.load(cos_t + i, mask=i < half, other=0.0).to(tl.float32)[None, :]
        sin = tl.load(sin_t + i, mask=i < half, other=0.0).to(tl.float32)[None, :]
        _rotate_heads(q_ptr + h * GROUP * stride_qh, t, stride_qt, stride_qh, GROUP, cos, sin, half,
                      BLOCK_G, BLOCK_D // 2)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:  # negative slots are padding tokens (vLLM's convention): nothing to write
        blk = slot // BLOCK_SIZE
        pos = slot % BLOCK_SIZE
        c_off = blk * stride_cb + pos * stride_ct + h * stride_ch
        sz_off = blk * stride_zb + pos * stride_zt + h * stride_zh
        _store_token(k_ptr + t * stride_kt + h * stride_kh, kc_ptr, ksz_ptr, c_off, sz_off, D, cos_t, sin_t, half,
                     KV_BITS, BLOCK_D, ROPE)
        _store_token(v_ptr + t * stride_vt + h * stride_vh, vc_ptr, vsz_ptr, c_off, sz_off, D, cos_t, sin_t, half,
                     KV_BITS, BLOCK_D, False)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, kv_bits: int = 16, k_scale_zero: torch.Tensor | None = None,
             v_scale_zero: torch.Tensor | None = None, rope: tuple | None = None) -> None:
    """k, v [T, KVH, D] -> their cache slots (slot = block * block_size + offset; < 0 skips), in place.

    rope = (q, cos, sin): q [T, H, D] (H a multiple of KVH) is rotated in place and k as it is
    stored (the tensor k is left as it is), by per-token cos, sin [T, D] in HF's layout, as
    `rotary_cos_sin` would have done before the write."""
    t, kvh, d = k.shape
    bs, cache_kvh = check_cache(k_cache, v_cache, kv_bits, k_scale_zero, v_scale_zero, d, "write_kv")
    if v.shape != k.shape or cache_kvh != kvh or slot_mapping.shape != (t,):
        raise ValueError(f"write_kv: k {tuple(k.shape)}, v {tuple(v.shape)}, slot_mapping "
                         f"{tuple(slot_mapping.shape)} and the cache's {cache_kvh} KV heads disagree")
    q, cos, sin = rope if rope is not None else (k, k, k)  # (unused pointers without rope)
    if rope is not None and (q.shape[0] != t or q.shape[1] % kvh or q.shape[2] != d or d % 2
                             or cos.shape != (t, d) or sin.shape != (t, d)):
        raise ValueError(f"write_kv: rope's q {tuple(q.shape)}, cos {tuple(cos.shape)} and sin {tuple(sin.shape)} "
                         f"disagree with k {tuple(k.shape)}")
    if rope is not None and (q.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1):
        raise ValueError("write_kv: rope's q, cos and sin need a contiguous last dim (q is rotated in place)")
    if t == 0:
        return
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    ksz = k_cache if kv_bits == 16 else k_scale_zero  # an unused pointer at 16 bits
    vsz = v_cache if kv_bits == 16 else v_scale_zero
    group = q.shape[1] // kvh if rope is not None else 1
    _write_kv_kernel[(t, kvh)](k, v, k_cache, v_cache, ksz, vsz, slot_mapping, q, cos, sin,
                               k.stride(0), k.stride(1), v.stride(0), v.stride(1), *k_cache.stride()[:3],
                               *sz_strides(k_scale_zero, kv_bits), q.stride(0), q.stride(1), cos.stride(0),
                               sin.stride(0), d, bs, group, KV_BITS=kv_bits, BLOCK_D=max(16, next_pow2(d)),
                               ROPE=rope is not None, BLOCK_G=next_pow2(group), num_warps=1,
                               **launch_options(k.device))


def _rotate_half_ref(x, cos, sin):
    """x [T, heads, D] rotated by per-token cos, sin [T, D] (HF's rotate-half layout), in fp32."""
    x = x.float()
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.float()[:, None] + torch.cat([-x2, x1], dim=-1) * sin.float()[:, None]


def write_kv_ref(k, v, k_cache, v_cache, slot_mapping, kv_bits=16, k_scale_zero=None, v_scale_zero=None,
                 rope=None) -> None:
    """Plain PyTorch write_kv (in place), quantizing with `quantize_kv_ref`; rope as write_kv's
    (rotated in fp32, rounded to q's and k's dtype)."""
    if rope is not None:
        q, cos, sin = rope
        q.copy_(_rotate_half_ref(q, cos, sin))
        k = _rotate_half_ref(k, cos, sin).to(k.dtype)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    bs = k_cache.shape[1]
    blk, pos = slots // bs, slots % bs
    for x, cache, sz in ((k[keep], k_cache, k_scale_zero), (v[keep], v_cache, v_scale_zero)):
        if kv_bits == 16:
            cache[blk, pos] = x.to(cache.dtype)
        else:
            codes, scale_zero = quantize_kv_ref(x, kv_bits)
            cache[blk, pos] = codes
            sz[blk, pos] = scale_zero
