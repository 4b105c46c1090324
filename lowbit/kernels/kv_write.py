"""Writing new tokens' K and V into the paged cache (fp16/bf16 copy, or int8/int4 quantization).

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
def _store_token(x_ptr, c_ptr, sz_ptr, c_off, sz_off, D,
                 KV_BITS: tl.constexpr, BLOCK_D: tl.constexpr):
    if KV_BITS == 16:
        d = tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + d, mask=d < D)
        tl.store(c_ptr + c_off + d, x.to(c_ptr.dtype.element_ty), mask=d < D)
    else:
        # even and odd dims apart: int4 stores them as the low and high nibble of one byte
        i = tl.arange(0, BLOCK_D // 2)
        m = 2 * i < D
        xe = tl.load(x_ptr + 2 * i, mask=m, other=0.0).to(tl.float32)
        xo = tl.load(x_ptr + 2 * i + 1, mask=m, other=0.0).to(tl.float32)
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
def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, ksz_ptr, vsz_ptr, slot_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_cb, stride_ct, stride_ch, stride_zb, stride_zt, stride_zh,
                     D, BLOCK_SIZE, KV_BITS: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_begin(USE_PDL)
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:  # negative slots are padding tokens (vLLM's convention): nothing to write
        blk = slot // BLOCK_SIZE
        pos = slot % BLOCK_SIZE
        c_off = blk * stride_cb + pos * stride_ct + h * stride_ch
        sz_off = blk * stride_zb + pos * stride_zt + h * stride_zh
        _store_token(k_ptr + t * stride_kt + h * stride_kh, kc_ptr, ksz_ptr, c_off, sz_off, D, KV_BITS, BLOCK_D)
        _store_token(v_ptr + t * stride_vt + h * stride_vh, vc_ptr, vsz_ptr, c_off, sz_off, D, KV_BITS, BLOCK_D)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, kv_bits: int = 16, k_scale_zero: torch.Tensor | None = None,
             v_scale_zero: torch.Tensor | None = None) -> None:
    """k, v [T, KVH, D] -> their cache slots (slot = block * block_size + offset; < 0 skips), in place."""
    t, kvh, d = k.shape
    bs, cache_kvh = check_cache(k_cache, v_cache, kv_bits, k_scale_zero, v_scale_zero, d, "write_kv")
    if v.shape != k.shape or cache_kvh != kvh or slot_mapping.shape != (t,):
        raise ValueError(f"write_kv: k {tuple(k.shape)}, v {tuple(v.shape)}, slot_mapping "
                         f"{tuple(slot_mapping.shape)} and the cache's {cache_kvh} KV heads disagree")
    if t == 0:
        return
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    ksz = k_cache if kv_bits == 16 else k_scale_zero  # an unused pointer at 16 bits
    vsz = v_cache if kv_bits == 16 else v_scale_zero
    _write_kv_kernel[(t, kvh)](k, v, k_cache, v_cache, ksz, vsz, slot_mapping,
                               k.stride(0), k.stride(1), v.stride(0), v.stride(1), *k_cache.stride()[:3],
                               *sz_strides(k_scale_zero, kv_bits), d, bs,
                               KV_BITS=kv_bits, BLOCK_D=max(16, next_pow2(d)), num_warps=1,
                               **launch_options(k.device))


def write_kv_ref(k, v, k_cache, v_cache, slot_mapping, kv_bits=16, k_scale_zero=None, v_scale_zero=None) -> None:
    """Plain PyTorch write_kv (in place), quantizing with `quantize_kv_ref`."""
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
