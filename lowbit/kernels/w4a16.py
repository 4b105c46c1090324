"""Weight-only quantized matmul: y = x @ dequant(W).T with 2/3/4/8-bit integer weights (W4A16).

Weights arrive as the quantizers produce them (`codes` uint8 [N, K], per-group `scales` [N, G] and
integer `zeros` [N, G]; w = (code - zero) * scale) and are repacked once by `pack_w4a16`:

* Columns are ordered by group (act-order g_idx: a stable sort; x is gathered the same way at
  call time) and each group is padded with zero columns to whole *planes* of P = 16 columns, so a
  plane never straddles two groups. `plane_group` [K_pad / P] names each plane's group.
* Codes live in a `cb`-bit container (cb = 4 for 2/3/4-bit, 8 for 8-bit), E = 32 / cb per int32.
  A block is E planes (E * P columns). `qweight_int32_kxn` [K_pad / E, N] is N-contiguous (a row
  of a tile is one coalesced load) and row r = b * P + i holds, in bits [j * cb, (j + 1) * cb),
  the code of column k = b * E * P + j * P + i. Code j of a tile is therefore a [P, N] plane whose
  x operand is a *contiguous* slice x[:, bEP + jP : bEP + jP + P]: no interleave, no reshape, and
  the plane feeds tl.dot (K = 16) directly.
* scales and zeros are stored [G, N] (N-contiguous) in fp16 when that keeps every scale to 1e-3
  (fp32 otherwise); zeros are integers, exact in fp16.

Dequantization is exact fp32 arithmetic plus one fma: the code is moved to the top of a float's
mantissa, f = 1 + code / 2**cb, so (code - zero) * scale = f * S - Z with S = scale * 2**cb and
Z = S + zero * scale. No int->float conversion instruction (a quarter-rate unit on Hopper).

Paths, by M (rows of x): at M = 1 on CUDA cores 'gemvh' (fp16x2: LOP3 dequantization and HFMA2
dots, scales applied once per group; 4-bit containers with natural groups of >= 64 columns),
'gemvf' (the same fold in fp32, any natural groups) and 'gemv' (per-weight fp32 dequantization
through the plane-group table: act-order); 'mm' (tensor cores; BM = 16 for M <= 16, larger tiles
for prefill) and 'dq' (dequantize to a dense [K, N] matrix, then cuBLAS; offered for M >= 256). gemv and mm split K over a second grid axis when the tiles alone would leave SMs idle:
each split stores an fp32 partial and the last split of a tile to arrive (a per-tile counter in
`locks`) sums them, all in one launch. Which config runs is timed once per (M bucket, N, K, bits,
dtype) in a CUDA graph and cached (lowbit.kernels._common); the counters assume one stream.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from lowbit.kernels._common import interpreting, new_empty, next_pow2, pick_config, sm_count

SUPPORTED_BITS = (2, 3, 4, 8)
PLANE = 16  # P: columns per plane = the K of one tl.dot
_MAX_SPLIT_TILES_PER_16N = 4  # split-K runs only while M <= 64: at most 4 row tiles of 16 per 16 columns
_TRITON_INTERPRET = interpreting()  # what @triton.jit saw when this module was imported
# Triton's CPU interpreter multiplies bf16 dot operands as raw bits: it gets fp32 operands instead
_DOT_F32 = tl.constexpr(_TRITON_INTERPRET)


def container_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"w4a16: {bits}-bit weights are not supported; use one of {SUPPORTED_BITS}")
    return 8 if bits == 8 else 4


@dataclass
class W4A16Weight:
    qweight_int32_kxn: torch.Tensor  # int32 [k_padded // E, N], layout in the module docstring
    scales_gxn: torch.Tensor  # fp16 or fp32 [G, N]
    zeros_gxn: torch.Tensor  # same dtype as scales [G, N], integer values
    plane_group: torch.Tensor  # int32 [k_padded // PLANE]
    x_index: torch.Tensor | None  # int64 [k_padded]: column of x at each packed position (K: zero); None = identity
    in_features: int
    out_features: int
    k_padded: int
    bits: int
    group_size: int
    block_uniform_groups: bool  # every block of E planes lies in one group: scales load once a block
    locks: torch.Tensor  # int32 zeros: split-K tile counters, each re-armed by the tile's last program

    @property
    def container_bits(self) -> int:
        return container_bits(self.bits)

    @property
    def n_blocks(self) -> int:
        return self.k_padded // (PLANE * 32 // self.container_bits)

    @property
    def group_planes(self) -> int | None:
        """Planes per group where groups lie in natural column order (no act-order gather), which
        the fold gemv computes instead of loading plane_group; None otherwise."""
        if self.x_index is not None:
            return None
        if self.group_size == -1:
            return self.k_padded // PLANE
        return self.group_size // PLANE if self.group_size % PLANE == 0 else None

    @property
    def nbytes(self) -> int:
        """Bytes one matmul reads for the weight: codes, scales, zeros and the plane table."""
        return sum(t.numel() * t.element_size()
                   for t in (self.qweight_int32_kxn, self.scales_gxn, self.zeros_gxn, self.plane_group))


def _group_of_columns(k: int, n_groups: int, group_size: int, g_idx, device) -> torch.Tensor:
    if g_idx is not None:
        grp = g_idx.to(device=device, dtype=torch.int64)
        if grp.shape != (k,):
            raise ValueError(f"w4a16: g_idx has shape {tuple(grp.shape)}, expected ({k},)")
    else:
        gs = k if group_size == -1 else group_size
        if gs <= 0 or k % gs:
            raise ValueError(f"w4a16: group size {group_size} does not divide in_features {k}")
        grp = torch.arange(k, device=device) // gs
    if k and (int(grp.min()) < 0 or int(grp.max()) >= n_groups):
        raise ValueError(f"w4a16: column groups must lie in [0, {n_groups}) (the scales' second dim)")
    return grp


def _scale_storage(scales: torch.Tensor) -> torch.Tensor:
    s = scales.float()
    s16 = s.half().float()
    # fp16 halves the bytes; keep fp32 where fp16 would move a scale by more than 1e-3 (degenerate
    # all-zero groups carry the quantizer's 1e-6 floor and reproduce 0 with any scale)
    ok = ((s16 - s).abs() <= 1e-3 * s.abs()) | (s.abs() <= 1.01e-6)
    return s.half() if bool(ok.all()) and bool(torch.isfinite(s16).all()) else s


def pack_w4a16(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
               g_idx: torch.Tensor | None = None, bits: int = 4) -> W4A16Weight:
    """codes uint8 [N, K], scales float [N, G], zeros int32 [N, G] -> the kernels' layout (on codes' device)."""
    cb = container_bits(bits)
    e = 32 // cb
    n, k = codes.shape
    n_groups = scales.shape[1]
    if scales.shape != (n, n_groups) or zeros.shape != (n, n_groups):
        raise ValueError(f"w4a16: scales {tuple(scales.shape)} and zeros {tuple(zeros.shape)} must both be [{n}, G]")
    dev = codes.device
    grp = _group_of_columns(k, n_groups, group_size, g_idx, dev)

    # order columns by group and pad every group to whole planes
    order = torch.argsort(grp, stable=True)
    grp_sorted = grp[order]
    counts = torch.bincount(grp, minlength=n_groups)
    padded = (counts + PLANE - 1) // PLANE * PLANE
    start_raw = torch.cumsum(counts, 0) - counts
    ends_pad = torch.cumsum(padded, 0)
    start_pad = ends_pad - padded
    new_pos = start_pad[grp_sorted] + (torch.arange(k, device=dev) - start_raw[grp_sorted])
    block = e * PLANE
    k_groups = int(ends_pad[-1]) if n_groups else 0
    k_pad = max(block, (k_groups + block - 1) // block * block)
    identity = bool(torch.equal(new_pos, order))
    x_index = None
    if not identity:
        x_index = torch.full((k_pad,), k, dtype=torch.int64, device=dev)
        x_index[new_pos] = order
    plane_start = torch.arange(k_pad // PLANE, device=dev) * PLANE
    plane_group = torch.searchsorted(ends_pad, plane_start, right=True).clamp(max=n_groups - 1).to(torch.int32)

    cp = torch.zeros(n, k_pad, dtype=torch.uint8, device=dev)
    cp[:, new_pos] = codes[:, order].to(torch.uint8)
    nb = k_pad // block
    cp = cp.view(n, nb, e, PLANE)
    words = torch.zeros(n, nb, PLANE, dtype=torch.int64, device=dev)
    for j in range(e):
        words |= (cp[:, :, j, :].to(torch.int64) & ((1 << cb) - 1)) << (j * cb)
    words = words.permute(1, 2, 0).reshape(nb * PLANE, n)  # row r = b * P + i, N contiguous
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32).contiguous()

    s = _scale_storage(scales)
    pg_blocks = plane_group.view(nb, e)
    uniform = bool((pg_blocks == pg_blocks[:, :1]).all())
    return W4A16Weight(qweight_int32_kxn=words, scales_gxn=s.t().contiguous(),
                       zeros_gxn=zeros.to(s.dtype).t().contiguous(), plane_group=plane_group.contiguous(),
                       x_index=x_index, in_features=k, out_features=n, k_padded=k_pad, bits=bits,
                       group_size=group_size, block_uniform_groups=uniform,
                       locks=torch.zeros(_MAX_SPLIT_TILES_PER_16N * triton.cdiv(n, 16), dtype=torch.int32, device=dev))


def w4a16_ref(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              group_size: int, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch: y = x @ ((codes - zeros[g]) * scales[g]).T in fp32, returned in x's dtype."""
    n, k = codes.shape
    grp = _group_of_columns(k, scales.shape[1], group_size, g_idx, codes.device)
    w = (codes.float() - zeros[:, grp].float()) * scales[:, grp].float()
    return (x.float() @ w.t()).to(x.dtype)


# ---- kernels ------------------------------------------------------------------------------------

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
def _plane_scales(s_ptr, z_ptr, pg_ptr, plane, offs_n, nmask, stride_g, CB: tl.constexpr):
    g = tl.load(pg_ptr + plane)
    s = tl.load(s_ptr + g * stride_g + offs_n, mask=nmask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + g * stride_g + offs_n, mask=nmask, other=0.0).to(tl.float32)
    S = s * (1 << CB)
    return S, S + z * s


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
            xv = tl.load(x_ptr + k, mask=k < KX, other=0.0).to(tl.float32)
            acc_g += xv[:, None] * _code_plus_one(w, j, CB)
            sx += xv
            if (j + 1) % FOLD == 0:
                # padding planes past the last group hold x = 0: any group's finite scale serves
                g = tl.minimum((b * E + j) // GROUP_PLANES, n_groups - 1)
                s = tl.load(s_ptr + g * stride_g + offs_n, mask=nmask, other=0.0).to(tl.float32)
                z = tl.load(z_ptr + g * stride_g + offs_n, mask=nmask, other=0.0).to(tl.float32)
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
    if _DOT_F32:  # the interpreter
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
                    P: tl.constexpr, BN: tl.constexpr, GROUP_PLANES: tl.constexpr, PARTIAL: tl.constexpr):
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
    for b in range(b_start, b_end):
        w = tl.load(w_ptrs + b * P * stride_wr, mask=nmask[None, :], other=0)
        k = b * (8 * P) + offs_p
        x0 = tl.load(x_ptr + k, mask=k < KX, other=0.0).to(tl.float32)
        x1 = tl.load(x_ptr + k + P, mask=k + P < KX, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + k + 2 * P, mask=k + 2 * P < KX, other=0.0).to(tl.float32)
        x3 = tl.load(x_ptr + k + 3 * P, mask=k + 3 * P < KX, other=0.0).to(tl.float32)
        x4 = tl.load(x_ptr + k + 4 * P, mask=k + 4 * P < KX, other=0.0).to(tl.float32)
        x5 = tl.load(x_ptr + k + 5 * P, mask=k + 5 * P < KX, other=0.0).to(tl.float32)
        x6 = tl.load(x_ptr + k + 6 * P, mask=k + 6 * P < KX, other=0.0).to(tl.float32)
        x7 = tl.load(x_ptr + k + 7 * P, mask=k + 7 * P < KX, other=0.0).to(tl.float32)
        sum_lo = tl.sum(x0 + x1 + x2 + x3, 0)
        sum_hi = tl.sum(x4 + x5 + x6 + x7, 0)
        p0 = _half_pair((x0 * 0.0625).to(tl.float16), (x4 * 0.0625).to(tl.float16))
        p1 = _half_pair((x1 * 0.0625).to(tl.float16), (x5 * 0.0625).to(tl.float16))
        p2 = _half_pair((x2 * 0.0625).to(tl.float16), (x6 * 0.0625).to(tl.float16))
        p3 = _half_pair((x3 * 0.0625).to(tl.float16), (x7 * 0.0625).to(tl.float16))
        r_lo, r_hi = _h2_dot(w, p0[:, None], p1[:, None], p2[:, None], p3[:, None])
        g_lo = tl.minimum((b * 8) // GROUP_PLANES, n_groups - 1)  # padding planes hold x = 0
        s_lo = tl.load(s_ptr + g_lo * stride_g + offs_n, mask=nmask, other=0.0).to(tl.float32)
        z_lo = tl.load(z_ptr + g_lo * stride_g + offs_n, mask=nmask, other=0.0).to(tl.float32)
        if GROUP_PLANES == 4:  # the block's halves are two groups
            g_hi = tl.minimum(g_lo + 1, n_groups - 1)
            s_hi = tl.load(s_ptr + g_hi * stride_g + offs_n, mask=nmask, other=0.0).to(tl.float32)
            z_hi = tl.load(z_ptr + g_hi * stride_g + offs_n, mask=nmask, other=0.0).to(tl.float32)
            acc += (16.0 * s_lo)[None, :] * r_lo + (16.0 * s_hi)[None, :] * r_hi
            acc_z += z_lo * s_lo * sum_lo + z_hi * s_hi * sum_hi
        else:
            acc += (16.0 * s_lo)[None, :] * (r_lo + r_hi)
            acc_z += z_lo * s_lo * (sum_lo + sum_hi)
    y = tl.sum(acc, axis=0) - acc_z
    _finish(y, out_ptr, ws_ptr, lock_ptr, pid_n, pid_s, split, offs_n, nmask, N, PARTIAL)


@triton.jit
def _mm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, pg_ptr, out_ptr, ws_ptr, lock_ptr,
               M, N, KX, n_blocks, blocks_per_split, split, stride_xm, stride_wr, stride_g,
               CB: tl.constexpr, P: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, U: tl.constexpr,
               GROUP_M: tl.constexpr, BLOCK_GROUPS: tl.constexpr, PARTIAL: tl.constexpr, WIDE: tl.constexpr):
    # tensor cores: each code plane is a [P, BN] operand against the contiguous x slice of its columns;
    # WIDE stacks a block's E planes into one [E * P, BN] operand (row j * P + i is column
    # b * E * P + j * P + i: plain K order) for one long dot, which suits large tiles
    E: tl.constexpr = 32 // CB
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    grid_m = tl.cdiv(M, BM)
    grid_n = tl.cdiv(N, BN)
    width = GROUP_M * grid_n  # GROUP_M row tiles walk the N tiles together: x and W stay in L2
    first_m = (pid // width) * GROUP_M
    rows_here = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows_here
    pid_n = (pid % width) // rows_here
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_p = tl.arange(0, P)
    mmask = offs_m < M
    nmask = offs_n < N
    acc = tl.zeros((BM, BN), tl.float32)
    b_start = pid_s * blocks_per_split
    b_end = tl.minimum(b_start + blocks_per_split, n_blocks)
    k_end = tl.minimum(KX, b_end * (E * P))
    for b0 in range(b_start, b_end, U):
        for u in tl.static_range(U):
            b = tl.minimum(b0 + u, b_end - 1)
            rows = b * P + offs_p
            w = tl.load(w_ptr + rows[:, None] * stride_wr + offs_n[None, :], mask=nmask[None, :], other=0)
            if WIDE:
                offs_j = tl.arange(0, E)
                g = tl.load(pg_ptr + b * E + offs_j)  # [E]: each plane's group
                sz = g[:, None] * stride_g + offs_n[None, :]
                sc = tl.load(s_ptr + sz, mask=nmask[None, :], other=0.0).to(tl.float32)
                S = sc * (1 << CB)
                Z = S + tl.load(z_ptr + sz, mask=nmask[None, :], other=0.0).to(tl.float32) * sc
                code = (w[None, :, :] >> (offs_j * CB)[:, None, None]) & ((1 << CB) - 1)  # [E, P, BN]
                f = ((code << (23 - CB)) | 0x3F800000).to(tl.float32, bitcast=True)
                wt = tl.reshape(f * S[:, None, :] - Z[:, None, :], (E * P, BN))
                k = (b0 + u) * (E * P) + tl.arange(0, E * P)
                xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :],
                             mask=mmask[:, None] & (k < k_end)[None, :], other=0.0)
                if _DOT_F32:
                    acc = tl.dot(xt.to(tl.float32), wt, acc)
                else:
                    acc = tl.dot(xt, wt.to(xt.dtype), acc)
            else:
                if BLOCK_GROUPS:
                    S, Z = _plane_scales(s_ptr, z_ptr, pg_ptr, b * E, offs_n, nmask, stride_g, CB)
                for j in tl.static_range(E):
                    if not BLOCK_GROUPS:
                        S, Z = _plane_scales(s_ptr, z_ptr, pg_ptr, b * E + j, offs_n, nmask, stride_g, CB)
                    k = (b0 + u) * (E * P) + j * P + offs_p
                    xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :],
                                 mask=mmask[:, None] & (k < k_end)[None, :], other=0.0)
                    wt = _dequant(w, S[None, :], Z[None, :], j, CB)
                    if _DOT_F32:
                        acc = tl.dot(xt.to(tl.float32), wt, acc)
                    else:
                        acc = tl.dot(xt, wt.to(xt.dtype), acc)
    offs_o = offs_m[:, None] * N + offs_n[None, :]
    omask = mmask[:, None] & nmask[None, :]
    _finish(acc, out_ptr, ws_ptr, lock_ptr, pid, pid_s, split, offs_o, omask, M * N, PARTIAL)


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, z_ptr, pg_ptr, out_ptr, N, stride_wr, stride_g,
                    CB: tl.constexpr, P: tl.constexpr, BN: tl.constexpr):
    # the dense [k_padded, N] weight for the cuBLAS path, one block of E planes per program row
    E: tl.constexpr = 32 // CB
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_p = tl.arange(0, P)
    nmask = offs_n < N
    w = tl.load(w_ptr + (b * P + offs_p)[:, None] * stride_wr + offs_n[None, :], mask=nmask[None, :], other=0)
    for j in tl.static_range(E):
        S, Z = _plane_scales(s_ptr, z_ptr, pg_ptr, b * E + j, offs_n, nmask, stride_g, CB)
        wt = _dequant(w, S[None, :], Z[None, :], j, CB)
        rows = b * (E * P) + j * P + offs_p
        tl.store(out_ptr + rows[:, None] * N + offs_n[None, :], wt.to(out_ptr.dtype.element_ty),
                 mask=nmask[None, :])


# ---- dispatch -----------------------------------------------------------------------------------

class Config(NamedTuple):
    kind: str  # 'gemv' | 'gemvf' (fold gemv, natural groups) | 'gemvh' (fp16x2 fold gemv) | 'mm' | 'dq'
    BM: int = 16
    BN: int = 64
    U: int = 1  # blocks (E planes each) per loop iteration
    split: int = 1  # K splits (second grid axis); > 1: the last split of a tile sums the partials
    warps: int = 4
    stages: int = 3
    wide: bool = False  # mm: one [E * P, BN] operand and one K = E * P dot per block, not E dots


def _fill_split(programs: int, n_blocks: int, sms: int) -> int:
    """K splits that give about two programs per multiprocessor, each with >= 2 blocks of K."""
    if programs >= 2 * sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, programs), n_blocks // 2, 64))


def _h2_applies(w: W4A16Weight) -> bool:
    """The fp16x2 gemv takes 4-bit containers whose natural groups span >= 64 columns."""
    return w.container_bits == 4 and w.group_planes is not None and w.group_planes >= 4


def _candidates(m: int, n: int, w: W4A16Weight, device: torch.device) -> list[Config]:
    nb = w.n_blocks
    sms = sm_count(device)
    cdiv = triton.cdiv
    if interpreting():  # small tiles: the interpreter's cost is per element
        if m == 1:
            kind = ("gemvh" if _h2_applies(w) else "gemvf") if w.group_planes else "gemv"
            return [Config(kind, 1, 32, 1, _fill_split(cdiv(n, 32), nb, sms), 4, 1)]
        bm = 16 if m <= 16 else 32
        return [Config("mm", bm, 32, 1, _fill_split(cdiv(m, bm) * cdiv(n, 32), nb, sms), 4, 1)]

    def with_splits(kind, bm, bn, u, warps, stages):
        programs = cdiv(m, bm) * cdiv(n, bn)
        fill = _fill_split(programs, nb, sms)
        return [Config(kind, bm, bn, u, s, warps, stages) for s in dict.fromkeys((fill, 1))]

    out: list[Config] = []
    if m == 1 and w.group_planes:
        # a thread holds BN / 128 16-byte loads of a row (x work is per row) and 16 / warps rows
        tiles = [(512, 4), (1024, 4), (1024, 8), (512, 2), (256, 4), (128, 4), (256, 8), (64, 2)]
        for kind in ["gemvh", "gemvf"] if _h2_applies(w) else ["gemvf"]:
            for bn, warps in tiles if kind == "gemvh" else tiles[4:]:
                fill = _fill_split(cdiv(n, bn), nb, sms)
                out += [Config(kind, 1, bn, 1, split, warps, 1) for split in dict.fromkeys((fill, 2 * fill))]
                if kind == "gemvh" and bn >= 512:  # longer loops, fewer partial sums; cp.async-pipelined loads
                    out += [Config(kind, 1, bn, 1, split, warps, st) for split in dict.fromkeys((max(1, fill // 2), fill))
                            for st in (1, 3) if (split, st) != (fill, 1)]
        return list(dict.fromkeys(out))
    if m == 1:
        for bn, u, warps in ((64, 2, 4), (128, 1, 4), (256, 1, 8), (32, 2, 4)):
            out += with_splits("gemv", 1, bn, u, warps, 3)
        # small unpipelined programs, many of them: latency hidden by occupancy, not by cp.async
        for bn, warps in ((128, 2), (256, 4)):
            fill = _fill_split(cdiv(n, bn), nb, 2 * sms)
            out += [Config("gemv", 1, bn, 1, fill, warps, 1), Config("gemv", 1, bn, 1, 2 * fill, warps, 1)]
    if m <= 16:
        for bn, u in ((64, 2), (128, 1), (32, 2), (64, 1)):
            out += with_splits("mm", 16, bn, u, 4, 3)
    elif m <= 64:
        for bm, bn in ((32, 64), (64, 64), (64, 128), (32, 128)):
            out += with_splits("mm", bm, bn, 1, 4, 3)
        out += [c._replace(wide=True) for c in with_splits("mm", 64, 128, 1, 4, 3)]
    else:
        for bm, bn, warps, stages in ((128, 128, 8, 3), (128, 128, 4, 3), (64, 128, 4, 4),
                                      (128, 256, 8, 3), (64, 256, 8, 3)):
            out += with_splits("mm", bm, bn, 1, warps, stages)
        for bm, bn, warps, stages in ((128, 128, 8, 3), (128, 128, 4, 3), (128, 256, 8, 3), (64, 128, 4, 3)):
            out += [c._replace(wide=True) for c in with_splits("mm", bm, bn, 1, warps, stages)]
        if m >= 256:
            out.append(Config("dq", BN=128))
    return list(dict.fromkeys(out))


def _launch(cfg: Config, x2: torch.Tensor, w: W4A16Weight, out: torch.Tensor) -> None:
    m, kx = x2.shape
    n = w.out_features
    cb = w.container_bits
    nb = w.n_blocks
    qw, s, z, pg = w.qweight_int32_kxn, w.scales_gxn, w.zeros_gxn, w.plane_group
    if cfg.kind == "dq":
        dense = torch.empty(w.k_padded, n, dtype=x2.dtype, device=x2.device)
        _dequant_kernel[(triton.cdiv(n, cfg.BN), nb)](qw, s, z, pg, dense, n, qw.stride(0), s.stride(0),
                                                      CB=cb, P=PLANE, BN=cfg.BN, num_warps=4)
        torch.matmul(x2, dense[:kx], out=out)
        return
    bps = triton.cdiv(nb, cfg.split)
    split = triton.cdiv(nb, bps)
    tiles = triton.cdiv(m, cfg.BM) * triton.cdiv(n, cfg.BN)
    if split > 1 and tiles > w.locks.numel():
        split, bps = 1, nb  # more tiles than counters (a config for large M): no split
    partial = split > 1
    ws = new_empty((split, m, n), torch.float32, x2.device) if partial else out
    if cfg.kind == "gemvh":
        _gemv_h2_kernel[(triton.cdiv(n, cfg.BN), split)](
            x2, qw, s, z, out, ws, w.locks, n, kx, s.shape[0], nb, bps, split, qw.stride(0), s.stride(0),
            P=PLANE, BN=cfg.BN, GROUP_PLANES=w.group_planes, PARTIAL=partial,
            num_warps=cfg.warps, num_stages=cfg.stages)
    elif cfg.kind == "gemvf":
        _gemv_fold_kernel[(triton.cdiv(n, cfg.BN), split)](
            x2, qw, s, z, out, ws, w.locks, n, kx, s.shape[0], nb, bps, split, qw.stride(0), s.stride(0),
            CB=cb, P=PLANE, BN=cfg.BN, GROUP_PLANES=w.group_planes, PARTIAL=partial,
            num_warps=cfg.warps, num_stages=cfg.stages)
    elif cfg.kind == "gemv":
        _gemv_kernel[(triton.cdiv(n, cfg.BN), split)](
            x2, qw, s, z, pg, out, ws, w.locks, n, kx, nb, bps, split, qw.stride(0), s.stride(0),
            CB=cb, P=PLANE, BN=cfg.BN, U=cfg.U, BLOCK_GROUPS=w.block_uniform_groups, PARTIAL=partial,
            num_warps=cfg.warps, num_stages=cfg.stages)
    else:
        _mm_kernel[(tiles, split)](
            x2, qw, s, z, pg, out, ws, w.locks, m, n, kx, nb, bps, split, x2.stride(0), qw.stride(0), s.stride(0),
            CB=cb, P=PLANE, BM=cfg.BM, BN=cfg.BN, U=cfg.U, GROUP_M=8, BLOCK_GROUPS=w.block_uniform_groups,
            PARTIAL=partial, WIDE=cfg.wide, num_warps=cfg.warps, num_stages=cfg.stages)


def tune_key(m: int, w: W4A16Weight, dtype: torch.dtype) -> tuple:
    """What a tuned config is cached under: path-relevant M bucket, shape, bits, dtypes."""
    bucket = m if m <= 4 else min(next_pow2(m), 8192)
    return ("w4a16", bucket, w.out_features, w.k_padded, w.container_bits, dtype, w.scales_gxn.dtype)


def w4a16_matmul(x: torch.Tensor, w: W4A16Weight, config: Config | None = None) -> torch.Tensor:
    """x [..., K] (fp16/bf16; fp32 runs its dots in tf32) -> [..., N] in x's dtype, fp32 accumulation.

    `config` pins a kernel config (tests, benchmarks); by default it is chosen per shape."""
    k, n = w.in_features, w.out_features
    if x.shape[-1] != k:
        raise ValueError(f"w4a16_matmul: x has {x.shape[-1]} features, the weight expects {k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if w.x_index is not None:  # act-order: the packed column order, zero for padding columns
        x2 = torch.nn.functional.pad(x2, (0, 1)).index_select(1, w.x_index)
    elif x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = new_empty((m, n), x.dtype, x.device)
    if m == 0:
        return out.reshape(*lead, n)
    if config is None:
        config = pick_config(tune_key(m, w, x.dtype), lambda: _candidates(m, n, w, x.device), lambda c: _launch(c, x2, w, out), x.device)
    _launch(config, x2, w, out)
    return out.reshape(*lead, n)
