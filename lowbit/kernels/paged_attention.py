"""Decode attention over the paged KV cache: one query per sequence, at position context_len - 1.

One program per (sequence, KV head, context split) holds the whole GQA group of query heads as the
rows of its tiles (padded to 16 for tl.dot), so each K/V byte is read once per group. Long
contexts with few sequences are split over the context (flash-decoding): each split writes its
normalised output and log-sum-exp, and a second kernel merges them. int8/int4 caches are
dequantized in registers right after the load (lowbit/kernels/kv_tile.py).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from lowbit.kernels._common import interpreting, new_empty, next_pow2, sm_count
from lowbit.kernels.kv_tile import check_cache, gather_kv_ref, load_kv_tile, sz_strides

_TRITON_INTERPRET = interpreting()
_DOT_F32 = tl.constexpr(_TRITON_INTERPRET)  # the interpreter multiplies bf16 dot operands as raw bits
NO_WINDOW = 1 << 30

# tile config, by head_dim bucket; the benchmark may override (the `config` argument)
DEFAULT_CONFIG = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2}


@triton.jit
def _decode_kernel(q_ptr, kc_ptr, vc_ptr, ksz_ptr, vsz_ptr, bt_ptr, ctx_ptr, out_ptr, lse_ptr,
                   stride_qs, stride_qh, stride_cb, stride_ct, stride_ch, stride_zb, stride_zt, stride_zh,
                   stride_bts, stride_os, stride_oh, stride_osp, stride_ls, stride_lh,
                   qk_scale, window, tokens_per_split, D, QH,
                   KV_BITS: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PARTIAL: tl.constexpr):
    s = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    ctx = tl.load(ctx_ptr + s)
    start = sp * tokens_per_split
    end = tl.minimum(start + tokens_per_split, ctx)
    start = tl.maximum(start, ctx - window)  # the query at ctx - 1 sees keys t > ctx - 1 - window
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    hmask = offs_h < QH
    heads = kvh * QH + offs_h
    q = tl.load(q_ptr + s * stride_qs + heads[:, None] * stride_qh + offs_d[None, :],
                mask=hmask[:, None] & (offs_d < D)[None, :], other=0.0)
    if _DOT_F32:
        q = q.to(tl.float32)
    m_i = tl.full((BLOCK_H,), -float("inf"), tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), tl.float32)
    for t0 in range(start, end, BLOCK_N):  # every tile holds >= 1 live token, so m_i stays finite
        t = t0 + tl.arange(0, BLOCK_N)
        tmask = t < end
        blk = tl.load(bt_ptr + s * stride_bts + t // BLOCK_SIZE, mask=tmask, other=0).to(tl.int64)
        slot = t % BLOCK_SIZE
        tok = blk * stride_cb + slot * stride_ct + kvh * stride_ch
        zoff = blk * stride_zb + slot * stride_zt + kvh * stride_zh
        k = load_kv_tile(kc_ptr, ksz_ptr, tok, zoff, tmask, D, KV_BITS, BLOCK_N, BLOCK_D).to(q.dtype)
        sc = tl.dot(q, tl.trans(k)) * qk_scale  # log2 units
        sc = tl.where(tmask[None, :], sc, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        p = tl.math.exp2(sc - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_kv_tile(vc_ptr, vsz_ptr, tok, zoff, tmask, D, KV_BITS, BLOCK_N, BLOCK_D).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    omask = hmask[:, None] & (offs_d < D)[None, :]
    o_ptrs = out_ptr + s * stride_os + heads[:, None] * stride_oh + offs_d[None, :]
    if PARTIAL:
        tl.store(o_ptrs + sp * stride_osp, o, mask=omask)
        lse = tl.where(l_i > 0, m_i + tl.math.log2(l_safe), -float("inf"))
        tl.store(lse_ptr + s * stride_ls + heads * stride_lh + sp, lse, mask=hmask)
    else:
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _merge_splits_kernel(part_ptr, lse_ptr, out_ptr, SPLITS, D,
                         stride_ps, stride_ph, stride_psp, stride_ls, stride_lh, stride_os, stride_oh,
                         BLOCK_SP: tl.constexpr, BLOCK_D: tl.constexpr):
    s = tl.program_id(0)
    h = tl.program_id(1)
    offs_sp = tl.arange(0, BLOCK_SP)
    offs_d = tl.arange(0, BLOCK_D)
    spmask = offs_sp < SPLITS
    lse = tl.load(lse_ptr + s * stride_ls + h * stride_lh + offs_sp, mask=spmask, other=-float("inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == -float("inf"), 0.0, top)
    wts = tl.math.exp2(lse - top)  # empty splits (lse = -inf) weigh 0
    part = tl.load(part_ptr + s * stride_ps + h * stride_ph + offs_sp[:, None] * stride_psp + offs_d[None, :],
                   mask=spmask[:, None] & (offs_d < D)[None, :], other=0.0)
    total = tl.sum(wts, 0)
    o = tl.sum(wts[:, None] * part, 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + s * stride_os + h * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty), mask=offs_d < D)


def _num_splits(seqs: int, kv_heads: int, max_ctx: int, device) -> int:
    base = seqs * kv_heads
    target = 4 * sm_count(device)  # a few programs per multiprocessor
    if base >= target:
        return 1
    return max(1, min(triton.cdiv(target, base), triton.cdiv(max_ctx, 256)))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, *, kv_bits: int = 16,
                           k_scale_zero: torch.Tensor | None = None, v_scale_zero: torch.Tensor | None = None,
                           sm_scale: float | None = None, sliding_window: int | None = None,
                           num_splits: int | None = None, max_context_len: int | None = None,
                           config: dict | None = None) -> torch.Tensor:
    """q [S, H, D] -> [S, H, D]. block_tables int32 [S, max_blocks], context_lens int32 [S] (>= 1).

    `max_context_len` (a bound, no device sync) sizes the context split; by default the block
    table's width. `num_splits` pins the split count (tests); `config` the tile config."""
    n_seq, n_heads, d = q.shape
    bs, kvh = check_cache(k_cache, v_cache, kv_bits, k_scale_zero, v_scale_zero, d, "paged_decode_attention")
    if n_heads % kvh:
        raise ValueError(f"paged_decode_attention: {n_heads} query heads are no multiple of {kvh} KV heads")
    if d > 256:
        raise ValueError(f"paged_decode_attention: head_dim {d} > 256 is not supported")
    out = new_empty((n_seq, n_heads, d), q.dtype, q.device)
    if n_seq == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    block_n = 16 if interpreting() else cfg["BLOCK_N"]
    qh = n_heads // kvh
    max_ctx = max_context_len or block_tables.shape[1] * bs
    splits = num_splits or _num_splits(n_seq, kvh, max_ctx, q.device)
    tps = triton.cdiv(triton.cdiv(max_ctx, splits), block_n) * block_n
    splits = triton.cdiv(max_ctx, tps)
    partial = splits > 1
    if partial:
        part = new_empty((n_seq, n_heads, splits, d), torch.float32, q.device)
        lse = new_empty((n_seq, n_heads, splits), torch.float32, q.device)
        o_arg, o_strides, l_strides = part, part.stride()[:3], lse.stride()[:2]
    else:
        lse = out  # unused
        o_arg, o_strides, l_strides = out, (*out.stride()[:2], 0), (0, 0)
    ksz = k_cache if kv_bits == 16 else k_scale_zero
    vsz = v_cache if kv_bits == 16 else v_scale_zero
    qk_scale = (sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)) * math.log2(math.e)
    block_d = max(16, next_pow2(d))
    _decode_kernel[(n_seq, kvh, splits)](
        q, k_cache, v_cache, ksz, vsz, block_tables, context_lens, o_arg, lse,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *sz_strides(k_scale_zero, kv_bits),
        block_tables.stride(0), *o_strides, *l_strides,
        qk_scale, sliding_window or NO_WINDOW, tps, d, qh,
        KV_BITS=kv_bits, BLOCK_SIZE=bs, BLOCK_H=max(16, next_pow2(qh)), BLOCK_N=block_n, BLOCK_D=block_d,
        PARTIAL=partial, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if partial:
        _merge_splits_kernel[(n_seq, n_heads)](
            part, lse, out, splits, d, *part.stride()[:3], *lse.stride()[:2], *out.stride()[:2],
            BLOCK_SP=max(2, next_pow2(splits)), BLOCK_D=block_d, num_warps=4)
    return out


def paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, *, kv_bits=16,
                               k_scale_zero=None, v_scale_zero=None, sm_scale=None,
                               sliding_window=None) -> torch.Tensor:
    """Plain PyTorch: gather each sequence's pages, dequantize, softmax attention in fp32."""
    n_seq, n_heads, d = q.shape
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    outs = []
    for s in range(n_seq):
        ctx = int(context_lens[s])
        k = gather_kv_ref(k_cache, k_scale_zero, block_tables[s], ctx, kv_bits)  # [ctx, KVH, D]
        v = gather_kv_ref(v_cache, v_scale_zero, block_tables[s], ctx, kv_bits)
        rep = n_heads // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        scores = torch.einsum("hd,thd->ht", q[s].float(), k) * scale
        if sliding_window:
            scores[:, : max(0, ctx - sliding_window)] = -float("inf")
        outs.append(torch.einsum("ht,thd->hd", scores.softmax(-1), v))
    return torch.stack(outs).to(q.dtype)
