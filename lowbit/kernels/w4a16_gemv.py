"""W4A16 at M = 1 on CUDA cores (lowbit/kernels/w4a16.py has the weight layout and the dispatch):

* `_gemv_kernel`: every weight dequantized in fp32 through the plane-group table (any grouping,
  act-order included);
* `_gemv_fold_kernel`: natural groups computed, the scale applied once per group;
* `_gemv_h2_kernel`: the same fold on fp16x2 (Marlin's LOP3 trick through inline PTX), for 4-bit
  containers whose groups span >= 64 columns.

Each program owns BN output columns and a range of K blocks; split-K partials are summed by the
last split of a tile (`_finish`).
"""
from __future__ import annotations

import triton
import triton.language as tl

from lowbit.kernels.pdl import pdl_begin
from lowbit.kernels.w4a16_tiles import (DOT_F32, _code_plus_one, _dequant, _finish, _group_scale_zero, _plane_scales,
                                        prefetch_blocks)


@triton.jit
def _x_plane(x_ptr, k, KX):
    """x at columns k in fp32; zero past KX (the padding columns of the last block)."""
    return tl.load(x_ptr + k, mask=k < KX, other=0.0).to(tl.float32)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, pg_ptr, out_ptr, ws_ptr, lock_ptr,
                 N, KX, n_blocks, blocks_per_split, split, stride_wr, stride_g,
                 CB: tl.constexpr, P: tl.constexpr, BN: tl.constexpr, U: tl.constexpr,
                 BLOCK_GROUPS: tl.constexpr, PARTIAL: tl.constexpr):
    # M = 1 on CUDA cores: a [P, BN] fp32 accumulator, reduced over P once at the end
    E: tl.constexpr = 32 // CB
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_p = tl.arange(0, P)
    nmask = offs_n < N
    acc = tl.zeros((P, BN), tl.float32)
    b_start = pid_s * blocks_per_split
    b_end = tl.minimum(b_start + blocks_per_split, n_blocks)
    k_end = tl.minimum(KX, b_end * (E * P))
    for b0 in range(b_start, b_end, U):
        for u in tl.static_range(U):
            # a ragged last iteration re-reads block b_end - 1 with x masked to zero
            b = tl.minimum(b0 + u, b_end - 1)
            rows = b * P + offs_p
            w = tl.load(w_ptr + rows[:, None] * stride_wr + offs_n[None, :], mask=nmask[None, :], other=0)
            if BLOCK_GROUPS:
                S, Z = _plane_scales(s_ptr, z_ptr, pg_ptr, b * E, offs_n, nmask, stride_g, CB)
            for j in tl.static_range(E):
                if not BLOCK_GROUPS:
                    S, Z = _plane_scales(s_ptr, z_ptr, pg_ptr, b * E + j, offs_n, nmask, stride_g, CB)
                k = (b0 + u) * (E * P) + j * P + offs_p
                xv = tl.load(x_ptr + k, mask=k < k_end, other=0.0).to(tl.float32)
                acc += xv[:, None] * _dequant(w, S[None, :], Z[None, :], j, CB)
    y = tl.sum(acc, axis=0)
    _finish(y, out_ptr, ws_ptr, lock_ptr, pid_n, pid_s, split, offs_n, nmask, N, PARTIAL)


@triton.jit
def _gemv_fold_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, lock_ptr,
                      N, KX, n_groups, n_blocks, blocks_per_split, split, stride_wr, stride_g,
                      CB: tl.constexpr, P: tl.constexpr, BN: tl.constexpr, GROUP_PLANES: tl.constexpr,
                      PARTIAL: tl.constexpr):
    # M = 1 where groups lie in natural order (no act-order): the group of plane p is p // GROUP_PLANES,
    # computed, not loaded. The scale is applied once per group, not per weight:
    #   sum_k x (q - z) s = A * sum_k x f - B * sum_k x,  f = 1 + q / 2**CB,  A = 2**CB s,  B = (2**CB + z) s
    # so the inner loop costs a shift, a LOP3 and one FMA per weight.
    E: tl.constexpr = 32 // CB
    FOLD: tl.constexpr = GROUP_PLANES if GROUP_PLANES < E else E  # planes between two folds
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_p = tl.arange(0, P)
    nmask = offs_n < N
    acc = tl.zeros((P, BN), tl.float32)
    b_start = pid_s * blocks_per_split
    b_end = tl.minimum(b_start + blocks_per_split, n_blocks)
    w_ptrs = w_ptr + offs_p[:, None] * stride_wr + offs_n[None, :]
    for b in range(b_start, b_end):
        # (loading block b + 1 by hand before computing block b measured no faster on the H100)
        w = tl.load(w_ptrs + b * P * stride_wr, mask=nmask[None, :], other=0)
        acc_g = tl.zeros((P, BN), tl.float32)
        sx = tl.zeros((P,), tl.float32)
        for j in tl.static_range(E):
            k = b * (E * P) + j * P + offs_p
            xv = _x_plane(x_ptr, k, KX)
            acc_g += xv[:, None] * _code_plus_one(w, j, CB)
            sx += xv
            if (j + 1) % FOLD == 0:
                # padding planes past the last group hold x = 0: any group's finite scale serves
                g = tl.minimum((b * E + j) // GROUP_PLANES, n_groups - 1)
                s, z = _group_scale_zero(s_ptr, z_ptr, g, offs_n, nmask, stride_g)
                acc += (s * (1 << CB))[None, :] * acc_g - (((1 << CB) + z) * s)[None, :] * sx[:, None]
                acc_g = tl.zeros((P, BN), tl.float32)
                sx = tl.zeros((P,), tl.float32)
    y = tl.sum(acc, axis=0)
    _finish(y, out_ptr, ws_ptr, lock_ptr, pid_n, pid_s, split, offs_n, nmask, N, PARTIAL)


# Eight 4-bit codes of one int32 against eight activations in fp16x2 (Marlin's LOP3 trick, Frantar
# et al. 2024): `(w >> 4j) & 0x000F000F | 0x64006400` is the half2 {1024 + code j, 1024 + code j+4},
# minus 1024 the exact codes; four HFMA2 take the dot with the activation pairs {x_j, x_j+4} (x / 16,
# so no partial sum can overflow fp16). Out: the two lanes' sums in fp32 (codes 0-3 and 4-7).
_H2_DOT_ASM = tl.constexpr("""
{
.reg .b32 t1, t2, t3, v0, v1, v2, v3, m, a;
.reg .f16 l, h;
.reg .f32 fl, fh;
mov.b32 m, 0x64006400;
lop3.b32 v0, $2, 0x000F000F, 0x64006400, 0xEA;
shr.u32 t1, $2, 4;
lop3.b32 v1, t1, 0x000F000F, 0x64006400, 0xEA;
shr.u32 t2, $2, 8;
lop3.b32 v2, t2, 0x000F000F, 0x64006400, 0xEA;
shr.u32 t3, $2, 12;
lop3.b32 v3, t3, 0x000F000F, 0x64006400, 0xEA;
sub.f16x2 v0, v0, m;
sub.f16x2 v1, v1, m;
sub.f16x2 v2, v2, m;
sub.f16x2 v3, v3, m;
mul.rn.f16x2 a, v0, $3;
fma.rn.f16x2 a, v1, $4, a;
fma.rn.f16x2 a, v2, $5, a;
fma.rn.f16x2 a, v3, $6, a;
mov.b32 {l, h}, a;
cvt.f32.f16 fl, l;
cvt.f32.f16 fh, h;
mov.b32 $0, fl;
mov.b32 $1, fh;
}
""")


@triton.jit
def _half_pair(a, b):
    """Two fp16 tensors -> int32 holding the half2 {a, b} (a in the low half)."""
    lo = a.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return lo | (b.to(tl.int16, bitcast=True).to(tl.int32) << 16)


@triton.jit
def _h2_dot_step(w, xp, J: tl.constexpr, lo, hi):
    xl = (xp & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
    xh = ((xp >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
    lo = (((w >> (4 * J)) & 0xF).to(tl.float16) * xl + lo).to(tl.float16)
    hi = (((w >> (4 * J + 16)) & 0xF).to(tl.float16) * xh + hi).to(tl.float16)
    return lo, hi


@triton.jit
def _h2_dot(w, x0, x1, x2, x3):
    """-> (sum_{j<4} q_j x_j, sum_{j>=4} q_j x_j) in fp32, per int32 w of 4-bit codes q_0..q_7;
    x0..x3 hold the half2 pairs {x_j, x_j+4}. The interpreter gets the same fp16 arithmetic in
    Triton ops (it cannot run PTX)."""
    if DOT_F32:  # the interpreter
        lo = tl.zeros(w.shape, tl.float16)
        hi = tl.zeros(w.shape, tl.float16)
        lo, hi = _h2_dot_step(w, x0, 0, lo, hi)
        lo, hi = _h2_dot_step(w, x1, 1, lo, hi)
        lo, hi = _h2_dot_step(w, x2, 2, lo, hi)
        lo, hi = _h2_dot_step(w, x3, 3, lo, hi)
        return lo.to(tl.float32), hi.to(tl.float32)
    lo, hi = tl.inline_asm_elementwise(_H2_DOT_ASM, "=r,=r,r,r,r,r,r", [w, x0, x1, x2, x3],
                                       dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
    return lo.to(tl.float32, bitcast=True), hi.to(tl.float32, bitcast=True)


@triton.jit
def _gemv_h2_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, lock_ptr,
                    N, KX, n_groups, n_blocks, blocks_per_split, split, stride_wr, stride_g,
                    P: tl.constexpr, BN: tl.constexpr, GROUP_PLANES: tl.constexpr, PARTIAL: tl.constexpr,
                    USE_PDL: tl.constexpr):
    # M = 1, 4-bit container, natural groups of >= 64 columns: each int32 is one _h2_dot (about two
    # instructions a weight), whose two lanes fall in the block's first and second half (E = 8
    # planes of P), so a group of 64 is one lane and of >= 128 both. Scales are applied per group:
    #   sum_k x (q - z) s = 16 s * sum_k (x / 16) q - z s * sum_k x
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_p = tl.arange(0, P)
    nmask = offs_n < N
    acc = tl.zeros((P, BN), tl.float32)
    acc_z = tl.zeros((BN,), tl.float32)  # sum over groups of z s * (sum of the group's x)
    b_start = pid_s * blocks_per_split
    b_end = tl.minimum(b_start + blocks_per_split, n_blocks)
    w_ptrs = w_ptr + offs_p[:, None] * stride_wr + offs_n[None, :]
    prefetch_blocks(w_ptr, b_start, n_blocks, pid_n * BN, N, stride_wr, P, BN, USE_PDL)
    pdl_begin(USE_PDL)
    for b in range(b_start, b_end):
        w = tl.load(w_ptrs + b * P * stride_wr, mask=nmask[None, :], other=0)
        k = b * (8 * P) + offs_p
        x0, x1 = _x_plane(x_ptr, k, KX), _x_plane(x_ptr, k + P, KX)
        x2, x3 = _x_plane(x_ptr, k + 2 * P, KX), _x_plane(x_ptr, k + 3 * P, KX)
        x4, x5 = _x_plane(x_ptr, k + 4 * P, KX), _x_plane(x_ptr, k + 5 * P, KX)
        x6, x7 = _x_plane(x_ptr, k + 6 * P, KX), _x_plane(x_ptr, k + 7 * P, KX)
        sum_lo = tl.sum(x0 + x1 + x2 + x3, 0)
        sum_hi = tl.sum(x4 + x5 + x6 + x7, 0)
        p0 = _half_pair((x0 * 0.0625).to(tl.float16), (x4 * 0.0625).to(tl.float16))
        p1 = _half_pair((x1 * 0.0625).to(tl.float16), (x5 * 0.0625).to(tl.float16))
        p2 = _half_pair((x2 * 0.0625).to(tl.float16), (x6 * 0.0625).to(tl.float16))
        p3 = _half_pair((x3 * 0.0625).to(tl.float16), (x7 * 0.0625).to(tl.float16))
        r_lo, r_hi = _h2_dot(w, p0[:, None], p1[:, None], p2[:, None], p3[:, None])
        g_lo = tl.minimum((b * 8) // GROUP_PLANES, n_groups - 1)  # padding planes hold x = 0
        s_lo, z_lo = _group_scale_zero(s_ptr, z_ptr, g_lo, offs_n, nmask, stride_g)
        if GROUP_PLANES == 4:  # the block's halves are two groups
            g_hi = tl.minimum(g_lo + 1, n_groups - 1)
            s_hi, z_hi = _group_scale_zero(s_ptr, z_ptr, g_hi, offs_n, nmask, stride_g)
            acc += (16.0 * s_lo)[None, :] * r_lo + (16.0 * s_hi)[None, :] * r_hi
            acc_z += z_lo * s_lo * sum_lo + z_hi * s_hi * sum_hi
        else:
            acc += (16.0 * s_lo)[None, :] * (r_lo + r_hi)
            acc_z += z_lo * s_lo * (sum_lo + sum_hi)
    y = tl.sum(acc, axis=0) - acc_z
    _finish(y, out_ptr, ws_ptr, lock_ptr, pid_n, pid_s, split, offs_n, nmask, N, PARTIAL)
