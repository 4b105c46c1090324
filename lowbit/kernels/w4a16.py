"""Weight-only quantized matmul: y = x @ dequant(W).T with 2/3/4/5/6/8-bit integer weights (W4A16).

Weights arrive as the quantizers produce them (`codes` uint8 [N, K], per-group `scales` [N, G] and
integer `zeros` [N, G]; w = (code - zero) * scale) and are repacked once by `pack_w4a16`:

* Columns are ordered by group (act-order g_idx: a stable sort; x is gathered the same way at
  call time) and each group is padded with zero columns to whole *planes* of P = 16 columns, so a
  plane never straddles two groups. `plane_group` [K_pad / P] names each plane's group.
* Codes live in a `cb`-bit container (cb = 4 for 2/3/4-bit, 8 for 5/6/8-bit), E = 32 / cb per int32.
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
through the plane-group table: act-order), all three in w4a16_gemv.py; for decode batches up to
M = 64 'mmh' (tensor cores fed by LOP3 fp16 dequantization, w4a16_mma.py: 4-bit, natural groups of
>= 64 columns, fp16) and 'mmt' (the same with the product swapped, out^T = W x^T, so that the
weights are the MMA's M side: Hopper's warpgroup MMA with the planes in registers); 'mm' (tensor
cores, fp32 dequantization: any weight; BM = 16 for M <= 16, larger tiles for prefill); 'dq'
(dequantize to a dense [K, N] matrix, then cuBLAS; offered for M >= 256). On Hopper-class GPUs
two CUDA C++ kernels (csrc/, built on first use by cuda_ext) join the candidates for mmh's weights
with groups of whole 64-column halves: 'gemvc' at M = 1 and 'mmc' (mma.sync fed straight from this
layout, no shared-memory copy of the weights) at M = 2..64. gemv and mm split K over
a second grid axis when the tiles alone would leave SMs idle: each split stores an fp32 partial and
the last split of a tile to arrive (a per-tile counter in `locks`) sums them, all in one launch. Which config runs is timed once per (M bucket, N, K, bits,
dtype) in a CUDA graph and cached (lowbit.kernels._common); the counters assume one stream.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from lowbit.kernels import cuda_ext
from lowbit.kernels._common import interpreting, new_empty, next_pow2, pick_config, sm_count
from lowbit.kernels.pdl import launch_options, use_pdl
from lowbit.kernels.tile_order import grouped_tile
from lowbit.kernels.w4a16_gemv import _gemv_fold_kernel, _gemv_h2_kernel, _gemv_kernel
from lowbit.kernels.w4a16_mma import _mm_h2_kernel
from lowbit.kernels.w4a16_tiles import DOT_F32, _dequant, _finish, _plane_scales

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
PLANE = 16  # P: columns per plane = the K of one tl.dot
_MAX_SPLIT_TILES_PER_16N = 4  # split-K runs only while M <= 64: at most 4 row tiles of 16 per 16 columns


def container_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"w4a16: {bits}-bit weights are not supported; use one of {SUPPORTED_BITS}")
    return 8 if bits > 4 else 4


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
    pid_m, pid_n = grouped_tile(pid, M, N, BM, BN, GROUP_M)
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
                if DOT_F32:
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
                    if DOT_F32:
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
    kind: str  # 'gemv' | 'gemvf' (fold gemv) | 'gemvh' (fp16x2 fold gemv) | 'gemvc' (CUDA C++ gemv) | 'mmh' | 'mmt' (swapped mmh) | 'mmc' (CUDA C++ tensor cores, M <= 64) | 'mm' | 'dq'
    BM: int = 16
    BN: int = 64
    U: int = 1  # blocks (E planes each) per loop iteration; gemvc / mmc: blocks in flight a warp
    # (stages: Triton's pipeline stages; gemvc: 1 = blocks in flight in registers, >= 2 = cp.async stages)
    split: int = 1  # K splits (second grid axis); > 1: the last split of a tile sums the partials
    warps: int = 4
    stages: int = 3
    wide: bool = False  # mm: one [E * P, BN] operand and one K = E * P dot per block, not E dots; gemvc: warps along N


def _fill_split(programs: int, n_blocks: int, sms: int) -> int:
    """K splits that give about two programs per multiprocessor, each with >= 2 blocks of K."""
    if programs >= 2 * sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, programs), n_blocks // 2, 64))


def _h2_applies(w: W4A16Weight) -> bool:
    """The fp16x2 gemv takes 4-bit containers whose natural groups span >= 64 columns."""
    return w.container_bits == 4 and w.group_planes is not None and w.group_planes >= 4


def _mmh_applies(w: W4A16Weight, dtype: torch.dtype) -> bool:
    """The fp16-dequantizing tensor-core kernel: the fp16x2 gemv's weights, fp16 x and scales."""
    return _h2_applies(w) and dtype == torch.float16 and w.scales_gxn.dtype == torch.float16


def _gemvc_applies(w: W4A16Weight, dtype: torch.dtype, device: torch.device) -> bool:
    """The CUDA C++ gemv (csrc/w4a16_gemv.cu): mmh's weights with groups of whole 64-column halves."""
    return (cuda_ext.enabled(device) and _mmh_applies(w, dtype) and w.group_planes % 4 == 0
            and w.out_features % 4 == 0)


_GEMVC_MAX_BLOCKS = 128  # blocks of K per program: their x (256 bytes each) plus the warps' sums fit 48 KB


def _gemvc_candidates(n: int, nb: int, sms: int, one_wave: bool) -> list[Config]:
    """Programs of BN = 32, 64 or 128 columns (1, 2 or 4 a lane) and 4, 8 or 16 warps over K; each
    warp's blocks of codes either held in flight in registers (stages 1: U = 2 or 4 blocks, the
    built pairs: more would spill) or streamed through `stages` >= 2 shared-memory stages by
    cp.async (2 or 4 columns a lane); K split across programs only as far as needed to give every
    SM one.

    With `one_wave` (a programmatic dependent launch, batch-1 decode) only grids the GPU holds at
    once are kept: such a kernel's programs request their first weights while the kernel before it
    still runs, but a second wave's programs start only as the first drains, each paying a memory
    latency on the step's critical path. Timed alone, one and two waves are close (qkv 12.4 us
    either way on the H100), so the tuner cannot see it. Measured in the decode chain on the H100:
    a 7B W4A16 step of 2229 us with every grid, 2205 us with one-wave grids (benchmarks/README.md,
    "Stop 8"). `LOWBIT_GEMV_ONE_WAVE=0` keeps every grid (for that comparison)."""
    out = []
    for bn, depths, warps in ((32, (4, 2), (8, 16)), (64, (2,), (4, 8, 16)), (128, (2,), (4, 8))):
        out += [Config("gemvc", 1, bn, u, s, w, 1) for u in depths for w in warps for s in _gemvc_splits(n, nb, bn, sms)]
    for bn, warps, stages in _GEMVC_ASYNC:
        out += [Config("gemvc", 1, bn, 1, s, warps, stages) for s in _gemvc_splits(n, nb, bn, sms)]
    for cols, warps, stages in _GEMVC_WIDE:
        bn = 32 * cols * warps
        out += [Config("gemvc", 1, bn, 1, s, warps, stages, wide=True) for s in _gemvc_splits(n, nb, bn, sms)]
    if one_wave and os.environ.get("LOWBIT_GEMV_ONE_WAVE", "1") != "0":
        out = [c for c in out if _gemvc_grid(c, n, nb) <= sms * _gemvc_resident(c, nb)] or out
    return out


# the cp.async kernels built in csrc/w4a16_gemv.cu: (BN, warps, shared-memory stages a warp), and
# those with their warps along N (wide: BN = 32 * columns a lane * warps): (columns a lane, warps, stages)
_GEMVC_ASYNC = ((64, 8, 2), (128, 4, 2))
_GEMVC_WIDE = ((4, 8, 2),)


def _gemvc_splits(n: int, nb: int, bn: int, sms: int) -> list[int]:
    """The fewest K splits that fit a program's x in shared memory, and enough to give every SM a program."""
    least = triton.cdiv(nb, _GEMVC_MAX_BLOCKS)
    return list(dict.fromkeys((least, max(least, min(nb // 2, triton.cdiv(sms, triton.cdiv(n, bn)))))))


def _gemvc_grid(cfg: Config, n: int, nb: int) -> int:
    """Programs of a gemvc launch: column tiles times the K splits left after rounding (as launched)."""
    bps = triton.cdiv(nb, cfg.split)
    return triton.cdiv(n, cfg.BN) * triton.cdiv(nb, bps)


@functools.lru_cache(maxsize=None)
def _gemvc_resident(cfg: Config, nb: int) -> int:
    """gemvc programs of `cfg` one multiprocessor holds at once (registers, threads, staged x)."""
    return cuda_ext.w4a16_module().w4a16_gemv_resident(cfg.warps, _gemvc_cols(cfg), cfg.U, _gemvc_stages(cfg),
                                                        cfg.wide, triton.cdiv(nb, cfg.split))


def _gemvc_cols(cfg: Config) -> int:
    """Output columns a lane of a gemvc config (a wide program's BN spans its warps side by side)."""
    return cfg.BN // (32 * cfg.warps) if cfg.wide else cfg.BN // 32


def _gemvc_stages(cfg: Config) -> int:
    """csrc's kStages of a gemvc config: 0 for the register-ring kernel (stages 1), else the cp.async stages."""
    return cfg.stages if cfg.stages >= 2 else 0


def _mmc_candidates(m: int, n: int, nb: int, sms: int) -> list[Config]:
    """Programs of 4 or 8 warps (32 output columns each), 2, 3 or 4 blocks in flight a warp (3 and 4
    only up to 32 rows: more would spill), K split so that the grid is one wave of 1-2 programs of
    8 warps an SM or 1-4 of 4 warps (a second, part-filled wave costs as much as the first).

    Why 3-4 programs of 4 warps: Nsight Compute on the H200 (M = 16, gate_up, 8 warps x 2 blocks in
    flight, 2 programs an SM) found the warps waiting on their weight loads 2.7 cycles per issued
    instruction: more blocks in flight an SM, which small programs with 3-4 blocks a warp hold
    within the registers, while 1-2 programs of 4 warps leave most of an SM's registers unused."""
    out = []
    for warps in (4, 8):
        tiles = triton.cdiv(n, 32 * warps)
        splits = dict.fromkeys(max(1, min(nb // 2, per_sm * sms // tiles))
                               for per_sm in ((4, 3, 2, 1) if warps == 4 else (2, 1)))
        for depth in (2, 3, 4) if m <= 32 else (2,):
            out += [Config("mmc", 64, 32 * warps, depth, s, warps, 1) for s in splits]
    return out


def _candidates(m: int, n: int, w: W4A16Weight, device: torch.device, dtype: torch.dtype) -> list[Config]:
    nb = w.n_blocks
    sms = sm_count(device)
    cdiv = triton.cdiv
    if interpreting():  # small tiles: the interpreter's cost is per element
        if m == 1:
            kind = ("gemvh" if _h2_applies(w) else "gemvf") if w.group_planes else "gemv"
            return [Config(kind, 1, 32, 1, _fill_split(cdiv(n, 32), nb, sms), 4, 1)]
        bm = 16 if m <= 16 else 32
        kind = "mmh" if m <= 64 and _mmh_applies(w, dtype) else "mm"
        return [Config(kind, bm, 32, 1, _fill_split(cdiv(m, bm) * cdiv(n, 32), nb, sms), 4, 1)]

    def with_splits(kind, bm, bn, u, warps, stages):
        programs = cdiv(m, bm) * cdiv(n, bn)
        fill = _fill_split(programs, nb, sms)
        return [Config(kind, bm, bn, u, s, warps, stages) for s in dict.fromkeys((fill, 1))]

    out: list[Config] = []
    if 1 < m <= 64 and _mmh_applies(w, dtype):
        # the tiles that won somewhere in benchmarks/results/bench_gemv_mm{h,t}_* (H100; at M = 1
        # the fp16x2 gemv always beat both): few, since every config is one more compile at start
        if m <= 16:
            tiles = [("mmt", 16, 64, 3), ("mmh", 16, 64, 3), ("mmh", 16, 64, 4), ("mmt", 16, 128, 3)]
        else:
            # the fp32 `mm` stays a candidate: on llama-3-8b gate_up at M = 64 it was 5% ahead of mmh
            tiles = [("mmt", 32, 64, 3), ("mmt", 64, 64, 3), ("mmt", 32, 128, 3), ("mmh", 32, 128, 3),
                     ("mmh", 32, 64, 3), ("mm", 64, 128, 3)]
        for kind, bm, bn, stages in tiles:
            out += with_splits(kind, bm, bn, 1, 4, stages)
        if _gemvc_applies(w, dtype, device):
            out += _mmc_candidates(m, n, nb, sms)
        return list(dict.fromkeys(out))
    if m == 1 and _gemvc_applies(w, dtype, device):
        out += _gemvc_candidates(n, nb, sms, one_wave=use_pdl(device))
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
    if cfg.kind in ("mmh", "mmt"):
        _mm_h2_kernel[(tiles, split)](
            x2, qw, s, z, out, ws, w.locks, m, n, kx, s.shape[0], nb, bps, split, x2.stride(0), qw.stride(0),
            s.stride(0), P=PLANE, BM=cfg.BM, BN=cfg.BN, GROUP_PLANES=w.group_planes, EVEN_K=kx % (8 * PLANE) == 0,
            EVEN_N=n % cfg.BN == 0, SWAP=cfg.kind == "mmt", PARTIAL=partial,
            # never a programmatic dependent: with it, W4A16 at concurrency 16 / 64 fell from 3528 /
            # 6103 to 2500 / 4706 tokens/s on the H100 (the next kernel's waiting programs take the
            # multiprocessors this grid's later programs need)
            num_warps=cfg.warps, num_stages=cfg.stages, USE_PDL=False)
    elif cfg.kind == "gemvc":
        cuda_ext.w4a16_module().w4a16_gemv(x2, qw, s, z, out, ws, w.locks, kx, w.group_planes, split,
                                           cfg.warps, _gemvc_cols(cfg), cfg.U, _gemvc_stages(cfg), cfg.wide,
                                           use_pdl(x2.device))
    elif cfg.kind == "mmc":
        # like mmh / mmt, never a programmatic dependent at decode batches (see above)
        cuda_ext.w4a16_module().w4a16_mma(x2, qw, s, z, out, ws, w.locks, kx, w.group_planes, split,
                                          cfg.warps, cfg.U, False)
    elif cfg.kind == "gemvh":
        _gemv_h2_kernel[(triton.cdiv(n, cfg.BN), split)](
            x2, qw, s, z, out, ws, w.locks, n, kx, s.shape[0], nb, bps, split, qw.stride(0), s.stride(0),
            P=PLANE, BN=cfg.BN, GROUP_PLANES=w.group_planes, PARTIAL=partial,
            num_warps=cfg.warps, num_stages=cfg.stages, **launch_options(x2.device))
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
        config = pick_config(tune_key(m, w, x.dtype), lambda: _candidates(m, n, w, x.device, x.dtype), lambda c: _launch(c, x2, w, out), x.device)
    _launch(config, x2, w, out)
    return out.reshape(*lead, n)
