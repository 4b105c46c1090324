"""What the W4A16 kernels share (lowbit/kernels/w4a16.py has the weight layout): a code as a float
by bit tricks, per-plane scales, the L2 prefetch of a program's first weight blocks, and the split-K
epilogue in which the last split of a tile sums the partials. Imported by w4a16.py, w4a16_gemv.py
and w4a16_mma.py; nothing here launches."""
from __future__ import annotations

import triton
import triton.language as tl

from lowbit.kernels._common import interpreting
from lowbit.kernels.pdl import prefetch_l2

_TRITON_INTERPRET = interpreting()  # what @triton.jit saw when this module was imported
# Triton's CPU interpreter multiplies bf16 dot operands as raw bits: it gets fp32 operands instead
DOT_F32 = tl.constexpr(_TRITON_INTERPRET)


@triton.jit
def _code_plus_one(w, J: tl.constexpr, CB: tl.constexpr):
    """Code J of each int32 in w as the float 1 + code / 2**CB (exact): one shift and one LOP3."""
    SH: tl.constexpr = J * CB - (23 - CB)  # moves code J to mantissa bits [23 - CB, 23)
    if SH > 0:
        t = w >> SH
    elif SH < 0:
        t = w << (-SH)
    else:
        t = w
    MASK: tl.constexpr = ((1 << CB) - 1) << (23 - CB)
    return ((t & MASK) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _dequant(w, S, Z, J: tl.constexpr, CB: tl.constexpr):
    """Code J of each int32 in w as (code - zero) * scale, given S = scale * 2**CB, Z = S + zero * scale."""
    return _code_plus_one(w, J, CB) * S - Z


@triton.jit
def _group_scale_zero(s_ptr, z_ptr, g, offs_n, nmask, stride_g):
    """Group g's scales and zeros of the columns offs_n, in fp32 (scales_gxn / zeros_gxn rows)."""
    s = tl.load(s_ptr + g * stride_g + offs_n, mask=nmask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + g * stride_g + offs_n, mask=nmask, other=0.0).to(tl.float32)
    return s, z


@triton.jit
def _plane_scales(s_ptr, z_ptr, pg_ptr, plane, offs_n, nmask, stride_g, CB: tl.constexpr):
    """(S, Z) of `_dequant` for a plane whose group the plane table names."""
    s, z = _group_scale_zero(s_ptr, z_ptr, tl.load(pg_ptr + plane), offs_n, nmask, stride_g)
    S = s * (1 << CB)
    return S, S + z * s


@triton.jit
def prefetch_blocks(w_ptr, b, n_blocks, n0, N, stride_wr, P: tl.constexpr, BN: tl.constexpr,
                    USE_PDL: tl.constexpr):
    """L2 prefetch of the weight rows of blocks b and b + 1 (columns n0 .. n0 + BN), one hint per
    128-byte line, issued before a programmatic dependent waits for the kernel before it. Indices
    are clamped into the tensor: a hint never points outside it."""
    if USE_PDL:
        LINES: tl.constexpr = (BN + 31) // 32
        cols = tl.minimum(n0 + tl.arange(0, LINES) * 32, N - 1)
        rows = tl.minimum(b * P + tl.arange(0, 2 * P), n_blocks * P - 1)
        prefetch_l2(w_ptr + rows[:, None] * stride_wr + cols[None, :], USE_PDL)


@triton.jit
def _finish(acc, out_ptr, ws_ptr, lock_ptr, tile, pid_s, split, offs_o, omask, MN,
            PARTIAL: tl.constexpr):
    """Store a tile, or with split-K add it to the others: every split writes its fp32 partial,
    the last to arrive (a counter per tile) sums them and stores, then re-arms the counter."""
    if PARTIAL:
        tl.store(ws_ptr + pid_s * MN + offs_o, acc, mask=omask)
        tl.debug_barrier()  # all of this program's partial is written before the release below
        arrived = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel")
        if arrived == split - 1:
            total = tl.zeros_like(acc)
            for s in range(split):  # .cg: read through L2, where the other programs' stores are
                total += tl.load(ws_ptr + s * MN + offs_o, mask=omask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + offs_o, total.to(out_ptr.dtype.element_ty), mask=omask)
            tl.atomic_xchg(lock_ptr + tile, 0)
    else:
        tl.store(out_ptr + offs_o, acc.to(out_ptr.dtype.element_ty), mask=omask)
