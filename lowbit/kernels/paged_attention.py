"""Decode attention over the paged KV cache: one query per sequence, at position context_len - 1.

One program per (sequence, KV head, context split) holds the whole GQA group of query heads as the
rows of its tiles (padded to 16 for tl.dot), so each K/V byte is read once per group. Long
contexts with few sequences are split over the context (flash-decoding): each split takes an equal
share of the sequence's actual context, writes its normalised output and log-sum-exp, and a second
kernel merges them. int8/int4 caches are
never dequantized element by element: the dots run on the raw codes (see _decode_kernel).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from lowbit.kernels._common import interpreting, new_empty, next_pow2, sm_count
from lowbit.kernels.kv_tile import check_cache, codes_minus, gather_kv_ref, sz_strides
from lowbit.kernels.pdl import launch_options, pdl_begin

_TRITON_INTERPRET = interpreting()
NO_WINDOW = 1 << 30

# tile config by kv_bits, from the sweep in benchmarks/results/kernels_h100_sweep.json (H100, head_dim
# 128, batch 1-32, context 8k-32k); the `config` argument overrides it
DEFAULT_CONFIG = {16: {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
                  8: {"BLOCK_N": 128, "num_warps": 4, "num_stages": 2},
                  4: {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}}


@triton.jit
def _codes_as(c, MAGIC16: tl.constexpr, DT: tl.constexpr):
    """uint8 codes as DT dot operands: with MAGIC16, fp16 1024 + code (the code or-ed under the
    exponent bits of 1024: one integer op); otherwise the code itself, via the fp32 mantissa."""
    if MAGIC16:
        x = (c.to(tl.int32) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
    else:
        x = codes_minus(c, 0.0).to(DT)
    return x


@triton.jit
def _decode_kernel(q_ptr, kc_ptr, vc_ptr, ksz_ptr, vsz_ptr, bt_ptr, ctx_ptr, out_ptr, lse_ptr,
                   stride_qs, stride_qh, stride_cb, stride_ct, stride_ch, stride_zb, stride_zt, stride_zh,
                   stride_bts, stride_os, stride_oh, stride_osp, stride_ls, stride_lh,
                   qk_scale, window, QH,
                   D: tl.constexpr, KV_BITS: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PARTIAL: tl.constexpr,
                   MAGIC16: tl.constexpr, UPCAST: tl.constexpr, USE_PDL: tl.constexpr):
    # Quantized K/V are never dequantized element by element: with per-token scale s and zero z,
    #   q . k_t = s_t (q . c_t) + (z_t - OFF s_t) sum(q)       and
    #   sum_t p_t v_t = (p s) @ c + sum_t p_t (z_t - OFF s_t)  (per output row),
    # so the dots run on the raw codes and only [tokens]-sized vectors see the scales. int4 splits
    # head_dim into even dims (low nibbles) and odd dims (high nibbles): two half-width dots.
    HALVES: tl.constexpr = 2 if KV_BITS == 4 else 1
    DH: tl.constexpr = BLOCK_D // HALVES
    CODE_OFF: tl.constexpr = 8.0 if KV_BITS == 4 else 128.0
    OFF: tl.constexpr = CODE_OFF + 1024.0 if MAGIC16 else CODE_OFF
    pdl_begin(USE_PDL)
    s = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    ctx = tl.load(ctx_ptr + s)
    # The splits share the keys this query sees (t > ctx - 1 - window), whatever the grid was sized
    # for: a CUDA graph's grid is sized for the longest context, and splits of that size would leave
    # a short context to one program walking its tiles one memory latency after another.
    lo = tl.maximum(ctx - window, 0)
    tokens_per_split = tl.cdiv(tl.cdiv(ctx - lo, tl.num_programs(2)), BLOCK_N) * BLOCK_N
    start = lo + sp * tokens_per_split
    end = tl.minimum(start + tokens_per_split, ctx)
    offs_h = tl.arange(0, BLOCK_H)
    offs_c = tl.arange(0, DH)  # a column of a half: dim offs_c * HALVES + half
    hmask = offs_h < QH
    cmask = offs_c < D // HALVES
    heads = kvh * QH + offs_h
    q_ptrs = q_ptr + s * stride_qs + heads[:, None] * stride_qh + (offs_c * HALVES)[None, :]
    q0 = tl.load(q_ptrs, mask=hmask[:, None] & cmask[None, :], other=0.0)
    q1 = q0
    if HALVES == 2:
        q1 = tl.load(q_ptrs + 1, mask=hmask[:, None] & cmask[None, :], other=0.0)
    if UPCAST:  # the interpreter multiplies bf16 dot operands as raw bits
        q0 = q0.to(tl.float32)
        q1 = q1.to(tl.float32)
    qsum = tl.sum(q0.to(tl.float32), 1)
    if HALVES == 2:
        qsum += tl.sum(q1.to(tl.float32), 1)
    m_i = tl.full((BLOCK_H,), -float("inf"), tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    acc0 = tl.zeros((BLOCK_H, DH), tl.float32)
    acc1 = tl.zeros((BLOCK_H, DH), tl.float32)
    for t0 in range(start, end, BLOCK_N):  # every tile holds >= 1 live token, so m_i stays finite
        t = t0 + tl.arange(0, BLOCK_N)
        tmask = t < end
        blk = tl.load(bt_ptr + s * stride_bts + t // BLOCK_SIZE, mask=tmask, other=0).to(tl.int64)
        slot = t % BLOCK_SIZE
        tok = blk * stride_cb + slot * stride_ct + kvh * stride_ch
        kv_ptrs = tok[:, None] + offs_c[None, :]
        kv_mask = tmask[:, None] & cmask[None, :]
        if KV_BITS == 16:
            k = tl.load(kc_ptr + kv_ptrs, mask=kv_mask, other=0.0).to(q0.dtype)
            sc = tl.dot(q0, tl.trans(k))
        else:
            zoff = blk * stride_zb + slot * stride_zt + kvh * stride_zh
            ks = tl.load(ksz_ptr + zoff, mask=tmask, other=0.0).to(tl.float32)
            kz = tl.load(ksz_ptr + zoff + 1, mask=tmask, other=0.0).to(tl.float32)
            kc = tl.load(kc_ptr + kv_ptrs, mask=kv_mask, other=0)
            if KV_BITS == 8:
                raw = tl.dot(q0, tl.trans(_codes_as(kc, MAGIC16, q0.dtype)))
            else:
                raw = tl.dot(q0, tl.trans(_codes_as(kc & 0xF, MAGIC16, q0.dtype)))
                raw = tl.dot(q1, tl.trans(_codes_as(kc >> 4, MAGIC16, q0.dtype)), raw)
            sc = raw * ks[None, :] + qsum[:, None] * (kz - OFF * ks)[None, :]
        sc = tl.where(tmask[None, :], sc * qk_scale, -float("inf"))  # log2 units
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        p = tl.math.exp2(sc - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if KV_BITS == 16:
            v = tl.load(vc_ptr + kv_ptrs, mask=kv_mask, other=0.0).to(q0.dtype)
            acc0 = acc0 * alpha[:, None] + tl.dot(p.to(q0.dtype), v)
        else:
            vs = tl.load(vsz_ptr + zoff, mask=tmask, other=0.0).to(tl.float32)
            vz = tl.load(vsz_ptr + zoff + 1, mask=tmask, other=0.0).to(tl.float32)
            pv = (p * vs[None, :]).to(q0.dtype)
            corr = (tl.sum(p * vz[None, :], 1) - OFF * tl.sum(pv.to(tl.float32), 1))[:, None]
            vc = tl.load(vc_ptr + kv_ptrs, mask=kv_mask, other=0)
            if KV_BITS == 8:
                acc0 = acc0 * alpha[:, None] + tl.dot(pv, _codes_as(vc, MAGIC16, q0.dtype)) + corr
            else:
                acc0 = acc0 * alpha[:, None] + tl.dot(pv, _codes_as(vc & 0xF, MAGIC16, q0.dtype)) + corr
                acc1 = acc1 * alpha[:, None] + tl.dot(pv, _codes_as(vc >> 4, MAGIC16, q0.dtype)) + corr
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    omask = hmask[:, None] & cmask[None, :]
    o_ptrs = out_ptr + s * stride_os + heads[:, None] * stride_oh + (offs_c * HALVES)[None, :]
    if PARTIAL:
        o_ptrs += sp * stride_osp
        tl.store(o_ptrs, acc0 / l_safe[:, None], mask=omask)
        if HALVES == 2:
            tl.store(o_ptrs + 1, acc1 / l_safe[:, None], mask=omask)
        lse = tl.where(l_i > 0, m_i + tl.math.log2(l_safe), -float("inf"))
        tl.store(lse_ptr + s * stride_ls + heads * stride_lh + sp, lse, mask=hmask)
    else:
        tl.store(o_ptrs, (acc0 / l_safe[:, None]).to(out_ptr.dtype.element_ty), mask=omask)
        if HALVES == 2:
            tl.store(o_ptrs + 1, (acc1 / l_safe[:, None]).to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _merge_splits_kernel(part_ptr, lse_ptr, out_ptr, SPLITS, D,
                         stride_ps, stride_ph, stride_psp, stride_ls, stride_lh, stride_os, stride_oh,
                         BLOCK_SP: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_begin(USE_PDL)
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
    cfg = {**DEFAULT_CONFIG[kv_bits], **(config or {})}
    block_n = 16 if interpreting() else cfg["BLOCK_N"]
    qh = n_heads // kvh
    max_ctx = max_context_len or block_tables.shape[1] * bs
    splits = num_splits or _num_splits(n_seq, kvh, max_ctx, q.device)
    # no more splits than the longest context fills with tiles (the kernel divides the actual one)
    splits = triton.cdiv(max_ctx, triton.cdiv(triton.cdiv(max_ctx, splits), block_n) * block_n)
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
        qk_scale, sliding_window or NO_WINDOW, qh,
        D=d, KV_BITS=kv_bits, BLOCK_SIZE=bs, BLOCK_H=max(16, next_pow2(qh)), BLOCK_N=block_n, BLOCK_D=block_d,
        PARTIAL=partial, MAGIC16=q.dtype == torch.float16, UPCAST=interpreting() and q.dtype == torch.bfloat16,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **launch_options(q.device))
    if partial:
        _merge_splits_kernel[(n_seq, n_heads)](
            part, lse, out, splits, d, *part.stride()[:3], *lse.stride()[:2], *out.stride()[:2],
            BLOCK_SP=max(2, next_pow2(splits)), BLOCK_D=block_d, num_warps=4, **launch_options(q.device))
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
