"""W4A16 on tensor cores for decode batches (M = 1..64), 4-bit codes dequantized to fp16 by bit
tricks (lowbit/kernels/w4a16.py has the weight layout and the dispatch).

`_mm_h2_kernel` turns each [P, BN] tile of int32 (eight 4-bit codes each: planes 0..7 of a block)
into eight fp16 planes of exact integers q - z with Marlin's LOP3 trick (Frantar et al. 2024) in
inline PTX, two int32 of the tile at a time: a PRMT pairs their low (high) halves, then
`(t >> 4j) & 0x000F000F | 0x64006400` is the half2 {1024 + q_j, 1024 + q'_j} and one HSUB2 against
{1024 + z, 1024 + z'} leaves q_j - z, q'_j - z' (exact in fp16): about 1.5 instructions a weight.
Each plane feeds one K = 16 tensor-core dot against its contiguous [BM, P] slice of x, and the
scale is applied once per group and output in fp32 (sum_k x (q - z) s = s * sum_k x (q - z)), not
per weight. With SWAP ('mmt'; 'mmh' without) the product is computed transposed, out^T = W x^T, so
that on Hopper the planes are the warpgroup MMA's register operand.

Planes 0-3 of a block are its first 64 columns and planes 4-7 the next 64, so the kernel takes
natural groups of >= 64 columns (g64: the two halves are two groups; g128 and wider: one) and fp16
activations; everything else runs `_mm_kernel`.
"""
from __future__ import annotations

import triton
import triton.language as tl

from lowbit.kernels.pdl import pdl_begin
from lowbit.kernels.w4a16_tiles import DOT_F32, _finish, prefetch_blocks

# Two elements at a time (pack = 2): $8, $9 = two int32 of codes (q_j in bits [4j, 4j + 4));
# $10 / $11 = the half2 {1024 + z, 1024 + z'} of their zeros for planes 0-3 / 4-7. Out $j = the
# half2 of plane j of both: {q_j - z, q'_j - z'}.
_PLANES_ASM = tl.constexpr("""
{
.reg .b32 lo, hi, t;
prmt.b32 lo, $8, $9, 0x5410;
prmt.b32 hi, $8, $9, 0x7632;
lop3.b32 $0, lo, 0x000F000F, 0x64006400, 0xEA;
shr.u32 t, lo, 4;
lop3.b32 $1, t, 0x000F000F, 0x64006400, 0xEA;
shr.u32 t, lo, 8;
lop3.b32 $2, t, 0x000F000F, 0x64006400, 0xEA;
shr.u32 t, lo, 12;
lop3.b32 $3, t, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 $4, hi, 0x000F000F, 0x64006400, 0xEA;
shr.u32 t, hi, 4;
lop3.b32 $5, t, 0x000F000F, 0x64006400, 0xEA;
shr.u32 t, hi, 8;
lop3.b32 $6, t, 0x000F000F, 0x64006400, 0xEA;
shr.u32 t, hi, 12;
lop3.b32 $7, t, 0x000F000F, 0x64006400, 0xEA;
sub.f16x2 $0, $0, $10;
sub.f16x2 $1, $1, $10;
sub.f16x2 $2, $2, $10;
sub.f16x2 $3, $3, $10;
sub.f16x2 $4, $4, $11;
sub.f16x2 $5, $5, $11;
sub.f16x2 $6, $6, $11;
sub.f16x2 $7, $7, $11;
}
""")


@triton.jit
def _plane_ref(w, J: tl.constexpr, z_lo, z_hi):
    """Plane J as the PTX computes it, in Triton ops for the interpreter: fp16 (1024 + q) minus
    fp16 (1024 + z), exact."""
    q = ((w >> (4 * J)) & 0xF).to(tl.float16) + 1024.0
    if J < 4:
        return (q - z_lo).to(tl.float16)
    return (q - z_hi).to(tl.float16)


@triton.jit
def _planes(w, z_lo, z_hi):
    """int32 [P, BN] of codes -> its eight fp16 planes q - z, each [P, BN]; z_lo / z_hi = 1024 + the
    zeros of planes 0-3 / 4-7 in fp16."""
    if DOT_F32:  # the interpreter cannot run PTX
        return (_plane_ref(w, 0, z_lo, z_hi), _plane_ref(w, 1, z_lo, z_hi), _plane_ref(w, 2, z_lo, z_hi),
                _plane_ref(w, 3, z_lo, z_hi), _plane_ref(w, 4, z_lo, z_hi), _plane_ref(w, 5, z_lo, z_hi),
                _plane_ref(w, 6, z_lo, z_hi), _plane_ref(w, 7, z_lo, z_hi))
    return tl.inline_asm_elementwise(_PLANES_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r", [w, z_lo, z_hi],
                                     dtype=(tl.float16,) * 8, is_pure=True, pack=2)


@triton.jit
def _load_n(ptrs, nmask, EVEN_N: tl.constexpr):
    """A load along the tile's output columns, masked only where N does not fill whole tiles."""
    if EVEN_N:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=nmask, other=0)


@triton.jit
def _along_n(v, SWAP: tl.constexpr):
    """A per-output-column vector [BN] shaped to broadcast over the tile: [BN, 1] swapped, else [1, BN]."""
    if SWAP:  # (one return: Triton checks every return of a function against the others)
        out = v[:, None]
    else:
        out = v[None, :]
    return out


@triton.jit
def _dot_plane(acc, x_ptrs, k0, KX, wt, EVEN_K: tl.constexpr, SWAP: tl.constexpr):
    """One plane, K = 16: acc [BM, BN] += x[:, k0 : k0 + P] @ wt [P, BN], or swapped acc [BN, BM] +=
    wt [BN, P] @ x[:, k0 : k0 + P]^T. Columns of x past KX (the last block's padding) read as 0
    unless K fills whole blocks."""
    if EVEN_K:
        xt = tl.load(x_ptrs + k0)
    elif SWAP:
        offs_p = tl.arange(0, x_ptrs.shape[0])
        xt = tl.load(x_ptrs + k0, mask=(k0 + offs_p < KX)[:, None], other=0.0)
    else:
        offs_p = tl.arange(0, x_ptrs.shape[1])
        xt = tl.load(x_ptrs + k0, mask=(k0 + offs_p < KX)[None, :], other=0.0)
    if DOT_F32:
        wt, xt = wt.to(tl.float32), xt.to(tl.float32)
    if SWAP:
        acc = tl.dot(wt, xt, acc)
    else:
        acc = tl.dot(xt, wt, acc)
    return acc


@triton.jit
def _mm_h2_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, lock_ptr,
                  M, N, KX, n_groups, n_blocks, blocks_per_split, split, stride_xm, stride_wr, stride_g,
                  P: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, GROUP_PLANES: tl.constexpr,
                  EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, SWAP: tl.constexpr, PARTIAL: tl.constexpr,
                  USE_PDL: tl.constexpr):
    # SWAP ('mmt') computes out^T [BN, BM] = W [BN, K] @ x^T [K, BM]: the dequantized planes are the
    # MMA's A operand, which Hopper's warpgroup MMA takes from registers, and BN >= 64 output columns
    # fill its 64-row tiles however small the batch. Otherwise ('mmh') out [BM, BN] = x @ W^T.
    # EVEN_K: KX fills whole blocks of 8 * P columns; EVEN_N: N fills whole tiles of BN. Then no
    # load needs a mask: rows past M read row M - 1 again and are dropped at the store.
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    grid_n = tl.cdiv(N, BN)
    pid_m = pid // grid_n  # decode batches are one or a few row tiles: they share each weight tile in L2
    pid_n = pid % grid_n
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_p = tl.arange(0, P)
    rows = tl.minimum(offs_m, M - 1)
    mmask = offs_m < M
    nmask = _along_n(offs_n < N, SWAP)
    if SWAP:
        acc = tl.zeros((BN, BM), tl.float32)
        w_ptrs = w_ptr + offs_n[:, None] + offs_p[None, :] * stride_wr
        x_ptrs = x_ptr + offs_p[:, None] + rows[None, :] * stride_xm
    else:
        acc = tl.zeros((BM, BN), tl.float32)
        w_ptrs = w_ptr + offs_p[:, None] * stride_wr + offs_n[None, :]
        x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_p[None, :]
    b_start = pid_s * blocks_per_split
    b_end = tl.minimum(b_start + blocks_per_split, n_blocks)
    prefetch_blocks(w_ptr, b_start, n_blocks, pid_n * BN, N, stride_wr, P, BN, USE_PDL)
    pdl_begin(USE_PDL)
    for b in range(b_start, b_end):
        w = _load_n(w_ptrs + b * P * stride_wr, nmask, EVEN_N)
        # the block's halves (planes 0-3 and 4-7) lie in groups g_lo and g_hi; padding planes past
        # the last group meet x = 0, so any group's finite scale serves them
        g_lo = tl.minimum((b * 8) // GROUP_PLANES, n_groups - 1)
        s_lo = _load_n(_along_n(s_ptr + g_lo * stride_g + offs_n, SWAP), nmask, EVEN_N).to(tl.float32)
        z_lo = (_load_n(_along_n(z_ptr + g_lo * stride_g + offs_n, SWAP), nmask, EVEN_N) + 1024.0).to(tl.float16)
        if GROUP_PLANES == 4:
            g_hi = tl.minimum(g_lo + 1, n_groups - 1)
            s_hi = _load_n(_along_n(s_ptr + g_hi * stride_g + offs_n, SWAP), nmask, EVEN_N).to(tl.float32)
            z_hi = (_load_n(_along_n(z_ptr + g_hi * stride_g + offs_n, SWAP), nmask, EVEN_N) + 1024.0).to(tl.float16)
        else:
            s_hi, z_hi = s_lo, z_lo
        w0, w1, w2, w3, w4, w5, w6, w7 = _planes(w, z_lo, z_hi)
        k0 = b * (8 * P)
        part = tl.zeros(acc.shape, tl.float32)
        part = _dot_plane(part, x_ptrs, k0, KX, w0, EVEN_K, SWAP)
        part = _dot_plane(part, x_ptrs, k0 + P, KX, w1, EVEN_K, SWAP)
        part = _dot_plane(part, x_ptrs, k0 + 2 * P, KX, w2, EVEN_K, SWAP)
        part = _dot_plane(part, x_ptrs, k0 + 3 * P, KX, w3, EVEN_K, SWAP)
        if GROUP_PLANES == 4:  # the halves have their own scales
            acc += part * s_lo
            part = tl.zeros(acc.shape, tl.float32)
        part = _dot_plane(part, x_ptrs, k0 + 4 * P, KX, w4, EVEN_K, SWAP)
        part = _dot_plane(part, x_ptrs, k0 + 5 * P, KX, w5, EVEN_K, SWAP)
        part = _dot_plane(part, x_ptrs, k0 + 6 * P, KX, w6, EVEN_K, SWAP)
        part = _dot_plane(part, x_ptrs, k0 + 7 * P, KX, w7, EVEN_K, SWAP)
        acc += part * s_hi
    if SWAP:
        offs_o = offs_m[None, :] * N + offs_n[:, None]
        omask = mmask[None, :] & nmask
    else:
        offs_o = offs_m[:, None] * N + offs_n[None, :]
        omask = mmask[:, None] & nmask
    _finish(acc, out_ptr, ws_ptr, lock_ptr, pid, pid_s, split, offs_o, omask, M * N, PARTIAL)
