"""W8A8 int8 on tensor cores: per-token dynamic (or static) int8 activation quantization, and
y = (x_q @ w_q^T) * x_scale[m] * w_scale[n] (+ bias) with int32 accumulation, the scales and bias
applied in the GEMM's epilogue, output in x's dtype (SmoothQuant's W8A8, compressed-tensors'
int-quantized layout: weights int8 [N, K] per output channel, activations per token).

Each kernel sits beside its plain-PyTorch reference (`quantize_rows_ref`, `int8_gemm_ref`); the
layer's own reference (lowbit/layers/w8a8_linear.py) computes the same integers, and tests check
both paths against an int64 product. Which GEMM tile runs is timed once per (M bucket, N, K) in a
CUDA graph and cached (lowbit.kernels._common.pick_config), as the W4A16 kernels are.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from lowbit.formats.compressed_tensors import INT8_MAX
from lowbit.formats.int8_activations import INT8_MIN_SCALE, quantize_int8_per_token, quantize_int8_static
from lowbit.kernels._common import interpreting, new_empty, next_pow2, pick_config
from lowbit.kernels.tile_order import grouped_tile

# the reference's constants for the kernels: Triton reads only constexpr globals (the interpreter
# does not check)
_QMAX = tl.constexpr(float(INT8_MAX))
_MIN_SCALE = tl.constexpr(INT8_MIN_SCALE)


# ---- activation quantization ------------------------------------------------------------------
@triton.jit
def _rint(v):
    # round half to even, as torch.round: floor(v + 0.5), minus 1 on exact ties whose floor is odd
    f = tl.floor(v + 0.5)
    tie = (f - v) == 0.5
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    return tl.where(tie & odd, f - 1.0, f)


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, static_ptr, K, stride_x, stride_q,
                       BLOCK: tl.constexpr, STATIC: tl.constexpr):
    # one row: its absmax (dynamic) or the calibrated scale (static), then round-to-nearest-even codes
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    if STATIC:
        scale = tl.load(static_ptr).to(tl.float32)
        lo = -_QMAX - 1.0  # static scales clip: the calibrated range may be exceeded
    else:
        amax = tl.zeros((BLOCK,), tl.float32)
        for k0 in range(0, K, BLOCK):
            x = tl.load(x_ptr + row * stride_x + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.max(amax, 0) / _QMAX, _MIN_SCALE)
        tl.store(s_ptr + row, scale)
        lo = -_QMAX
    for k0 in range(0, K, BLOCK):
        m = k0 + offs < K
        x = tl.load(x_ptr + row * stride_x + k0 + offs, mask=m, other=0.0).to(tl.float32)
        q = _rint(tl.math.div_rn(x, scale))  # IEEE division, as the reference's (`/` is approximate)
        q = tl.minimum(tl.maximum(q, lo), _QMAX)
        tl.store(q_ptr + row * stride_q + k0 + offs, q.to(tl.int8), mask=m)


def quantize_rows(x_mxk: torch.Tensor, static_scale: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (codes int8 [M, K], scale float32 [M] or the static [1]); x ~ codes * scale."""
    m, k = x_mxk.shape
    x = x_mxk if x_mxk.stride(-1) == 1 else x_mxk.contiguous()
    q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    s = static_scale.float().reshape(1) if static_scale is not None else new_empty((m,), torch.float32, x.device)
    if m and k:
        block = min(2048, max(16, next_pow2(k)))
        _quant_rows_kernel[(m,)](x, q, s, s, k, x.stride(0), q.stride(0), BLOCK=block,
                                 STATIC=static_scale is not None, num_warps=4)
    return q, s


def quantize_rows_ref(x_mxk: torch.Tensor, static_scale: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch, `quantize_rows`'s contract: the W8A8 layer's own per-token or static rule."""
    if static_scale is not None:
        s = static_scale.float().reshape(1)
        return quantize_int8_static(x_mxk, s), s
    return quantize_int8_per_token(x_mxk)


# ---- the GEMM ---------------------------------------------------------------------------------
@triton.jit
def _int8_gemm_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, c_ptr, M, N, K,
                      stride_am, stride_bn, stride_cm, SA_PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    mmask = offs_m < M
    nmask = offs_n < N
    acc = tl.zeros((BM, BN), tl.int32)
    for k0 in range(0, K, BK):
        kmask = k0 + offs_k < K
        a = tl.load(a_ptr + offs_m[:, None].to(tl.int64) * stride_am + (k0 + offs_k)[None, :],
                    mask=mmask[:, None] & kmask[None, :], other=0)
        b = tl.load(b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + (k0 + offs_k)[:, None],
                    mask=nmask[None, :] & kmask[:, None], other=0)  # [BK, BN]: B^T
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    if SA_PER_ROW:
        sa = tl.load(sa_ptr + offs_m, mask=mmask, other=0.0)
    else:
        sa = tl.load(sa_ptr + offs_m * 0)  # one static scale
    sb = tl.load(sb_ptr + offs_n, mask=nmask, other=0.0)
    y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :], y.to(c_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


class Tile(NamedTuple):
    BM: int
    BN: int
    BK: int
    warps: int = 4
    stages: int = 3


def _tiles(m: int) -> list[Tile]:
    if interpreting():
        return [Tile(16, 32, 32, 4, 1)]
    if m <= 16:
        return [Tile(16, 64, 128), Tile(16, 128, 128), Tile(16, 64, 256, 4, 4)]
    if m <= 64:
        return [Tile(64, 64, 128), Tile(64, 128, 128), Tile(32, 128, 128)]
    return [Tile(128, 128, 128, 8, 3), Tile(128, 256, 128, 8, 3), Tile(128, 128, 64, 4, 4), Tile(64, 128, 128, 4, 4)]


def int8_gemm(a_mxk: torch.Tensor, b_nxk: torch.Tensor, scale_a: torch.Tensor, scale_b_n: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype, tile: Tile | None = None) -> torch.Tensor:
    """int8 a [M, K] @ int8 b [N, K]^T in int32, times scale_a ([M] per token, or [1] static) and
    scale_b_n [N], plus bias [N] -> [M, N] in out_dtype."""
    m, k = a_mxk.shape
    n = b_nxk.shape[0]
    if b_nxk.shape[1] != k or a_mxk.dtype != torch.int8 or b_nxk.dtype != torch.int8:
        raise ValueError(f"int8_gemm: a {tuple(a_mxk.shape)} {a_mxk.dtype} and b {tuple(b_nxk.shape)} {b_nxk.dtype} "
                         "must be int8 [M, K] and [N, K]")
    a = a_mxk if a_mxk.stride(-1) == 1 else a_mxk.contiguous()
    b = b_nxk if b_nxk.stride(-1) == 1 else b_nxk.contiguous()
    c = new_empty((m, n), out_dtype, a.device)
    if m == 0 or n == 0:
        return c
    sa = scale_a.float().contiguous()
    sb = scale_b_n.float().contiguous()

    def launch(t: Tile) -> None:
        grid = (triton.cdiv(m, t.BM) * triton.cdiv(n, t.BN),)
        _int8_gemm_kernel[grid](a, b, sa, sb, bias if bias is not None else sb, c, m, n, k,
                                a.stride(0), b.stride(0), c.stride(0), SA_PER_ROW=sa.numel() == m, HAS_BIAS=bias is not None, BM=t.BM, BN=t.BN, BK=t.BK, GROUP_M=8,
                                num_warps=t.warps, num_stages=t.stages)

    if tile is None:
        bucket = min(next_pow2(m), 4096)
        tile = pick_config(("int8_gemm", bucket, n, k, out_dtype), lambda: _tiles(m), launch, a.device)
    launch(tile)
    return c


def int8_gemm_ref(a_mxk: torch.Tensor, b_nxk: torch.Tensor, scale_a: torch.Tensor, scale_b_n: torch.Tensor,
                  bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """Plain PyTorch: the integer product in int64, then the same fp32 epilogue."""
    acc = (a_mxk.long() @ b_nxk.long().t()).float()
    sa = scale_a.float().reshape(-1, 1) if scale_a.numel() == a_mxk.shape[0] else scale_a.float().reshape(1, 1)
    y = acc * sa * scale_b_n.float()[None, :]
    if bias is not None:
        y = y + bias.float()[None, :]
    return y.to(out_dtype)


def w8a8_int8_matmul(x: torch.Tensor, w_nxk: torch.Tensor, w_scale_n: torch.Tensor, bias: torch.Tensor | None,
                     x_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (fp16/bf16/fp32) -> [..., N] in x's dtype: x quantized per token (or with the static
    `x_scale`), the int8 GEMM, scales and bias in its epilogue."""
    x2 = x.reshape(-1, x.shape[-1])
    q, s = quantize_rows(x2, x_scale)
    y = int8_gemm(q, w_nxk, s, w_scale_n, bias, x.dtype)
    return y.view(*x.shape[:-1], w_nxk.shape[0])
