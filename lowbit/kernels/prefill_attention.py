"""Prefill attention over the paged KV cache for variable-length packed sequences.

Sequence i's queries are q[cu_seqlens_q[i] : cu_seqlens_q[i + 1]], the last q_len of its
context_lens[i] positions; they attend causally to everything in its pages (write_kv has already
stored their own K/V). That covers plain prefill (q_len == context), chunked prefill and prefix-cache
hits (q_len < context). Flash-attention 2 style: one program per (query tile, sequence, head), an
online softmax over key tiles gathered through the block table, int8/int4 dequantized on load.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from lowbit.kernels._common import interpreting, new_empty, next_pow2
from lowbit.kernels.kv_tile import check_cache, gather_kv_ref, load_kv_tile, sz_strides

_TRITON_INTERPRET = interpreting()
_DOT_F32 = tl.constexpr(_TRITON_INTERPRET)  # the interpreter multiplies bf16 dot operands as raw bits
NO_WINDOW = 1 << 30


@triton.jit
def _prefill_kernel(q_ptr, kc_ptr, vc_ptr, ksz_ptr, vsz_ptr, bt_ptr, cu_ptr, ctx_ptr, out_ptr,
                    stride_qt, stride_qh, stride_ot, stride_oh,
                    stride_cb, stride_ct, stride_ch, stride_zb, stride_zt, stride_zh, stride_bts,
                    qk_scale, window, D, QH,
                    KV_BITS: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    mb = tl.program_id(0)
    s = tl.program_id(1)
    h = tl.program_id(2)
    q0 = tl.load(cu_ptr + s)
    q_len = tl.load(cu_ptr + s + 1) - q0
    if mb * BLOCK_M < q_len:
        ctx = tl.load(ctx_ptr + s)
        kvh = h // QH
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mmask = offs_m < q_len
        pos = ctx - q_len + offs_m  # each query's position in its sequence
        q = tl.load(q_ptr + (q0 + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=mmask[:, None] & (offs_d < D)[None, :], other=0.0)
        if _DOT_F32:
            q = q.to(tl.float32)
        m_i = tl.full((BLOCK_M,), -float("inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        last = ctx - q_len + tl.minimum((mb + 1) * BLOCK_M, q_len)  # one past the tile's last query
        first = tl.maximum(ctx - q_len + mb * BLOCK_M - window + 1, 0)
        first = first // BLOCK_N * BLOCK_N
        for t0 in range(first, last, BLOCK_N):
            t = t0 + tl.arange(0, BLOCK_N)
            tmask = t < last
            blk = tl.load(bt_ptr + s * stride_bts + t // BLOCK_SIZE, mask=tmask, other=0).to(tl.int64)
            slot = t % BLOCK_SIZE
            tok = blk * stride_cb + slot * stride_ct + kvh * stride_ch
            zoff = blk * stride_zb + slot * stride_zt + kvh * stride_zh
            k = load_kv_tile(kc_ptr, ksz_ptr, tok, zoff, tmask, D, KV_BITS, BLOCK_N, BLOCK_D).to(q.dtype)
            sc = tl.dot(q, tl.trans(k)) * qk_scale  # log2 units
            rel = pos[:, None] - t[None, :]
            live = (rel >= 0) & (rel < window) & tmask[None, :]
            sc = tl.where(live, sc, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            m_use = tl.where(m_new == -float("inf"), 0.0, m_new)  # a row with no live key yet
            p = tl.math.exp2(sc - m_use[:, None])
            alpha = tl.math.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = load_kv_tile(vc_ptr, vsz_ptr, tok, zoff, tmask, D, KV_BITS, BLOCK_N, BLOCK_D).to(q.dtype)
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v)
            m_i = m_new
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + (q0 + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=mmask[:, None] & (offs_d < D)[None, :])


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                            *, kv_bits: int = 16, k_scale_zero: torch.Tensor | None = None,
                            v_scale_zero: torch.Tensor | None = None, sm_scale: float | None = None,
                            sliding_window: int | None = None, max_seqlen_q: int | None = None) -> torch.Tensor:
    """q [T, H, D] (packed sequences) -> [T, H, D]. cu_seqlens_q int32 [S + 1], context_lens int32 [S].

    `max_seqlen_q` (the longest q_len) sizes the grid; without it one device sync computes it."""
    n_tok, n_heads, d = q.shape
    bs, kvh = check_cache(k_cache, v_cache, kv_bits, k_scale_zero, v_scale_zero, d, "paged_prefill_attention")
    if n_heads % kvh:
        raise ValueError(f"paged_prefill_attention: {n_heads} query heads are no multiple of {kvh} KV heads")
    if d > 256:
        raise ValueError(f"paged_prefill_attention: head_dim {d} > 256 is not supported")
    out = new_empty((n_tok, n_heads, d), q.dtype, q.device)
    n_seq = cu_seqlens_q.shape[0] - 1
    if n_tok == 0 or n_seq == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    block_d = max(16, next_pow2(d))
    if interpreting():
        block_m, block_n, warps, stages = 16, 16, 4, 1
    else:
        block_m, block_n = (64, 64) if block_d <= 128 else (32, 32)
        warps, stages = 4, 2
    ksz = k_cache if kv_bits == 16 else k_scale_zero
    vsz = v_cache if kv_bits == 16 else v_scale_zero
    qk_scale = (sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)) * math.log2(math.e)
    grid = (triton.cdiv(max_seqlen_q, block_m), n_seq, n_heads)
    _prefill_kernel[grid](q, k_cache, v_cache, ksz, vsz, block_tables, cu_seqlens_q, context_lens, out,
                          q.stride(0), q.stride(1), out.stride(0), out.stride(1), *k_cache.stride()[:3],
                          *sz_strides(k_scale_zero, kv_bits), block_tables.stride(0),
                          qk_scale, sliding_window or NO_WINDOW, d, n_heads // kvh,
                          KV_BITS=kv_bits, BLOCK_SIZE=bs, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                          num_warps=warps, num_stages=stages)
    return out


def paged_prefill_attention_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, *, kv_bits=16,
                                k_scale_zero=None, v_scale_zero=None, sm_scale=None,
                                sliding_window=None) -> torch.Tensor:
    """Plain PyTorch: per sequence, gather pages, dequantize, causal (windowed) softmax in fp32."""
    n_tok, n_heads, d = q.shape
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    out = torch.empty(n_tok, n_heads, d, dtype=torch.float32, device=q.device)
    for s in range(cu_seqlens_q.shape[0] - 1):
        a, b = int(cu_seqlens_q[s]), int(cu_seqlens_q[s + 1])
        ctx = int(context_lens[s])
        k = gather_kv_ref(k_cache, k_scale_zero, block_tables[s], ctx, kv_bits)
        v = gather_kv_ref(v_cache, v_scale_zero, block_tables[s], ctx, kv_bits)
        rep = n_heads // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        scores = torch.einsum("qhd,thd->hqt", q[a:b].float(), k) * scale
        pos = torch.arange(ctx - (b - a), ctx, device=q.device)[:, None]
        rel = pos - torch.arange(ctx, device=q.device)[None, :]
        live = (rel >= 0) & (rel < (sliding_window or NO_WINDOW))
        scores = scores.masked_fill(~live, -float("inf"))
        out[a:b] = torch.einsum("hqt,thd->qhd", scores.softmax(-1), v)
    return out.to(q.dtype)
