"""RMSNorm (Zhang & Sennrich 2019), optionally fused with the residual add before it (vLLM's
fused_add_rms_norm): new_residual = x + residual, out = norm(new_residual) * weight.

Rounding follows HF Llama: the residual sum is rounded to x's dtype, normalised in fp32, rounded
to x's dtype again and only then multiplied by the weight. One program per row.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels._common import interpreting, new_empty, next_pow2
from lowbit.kernels.pdl import launch_options, pdl_begin

_TRITON_INTERPRET = interpreting()


@triton.jit
def _rmsnorm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, new_r_ptr, D, eps,
                    stride_x, stride_r, stride_o, stride_nr,
                    HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_begin(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    m = d < D
    x = tl.load(x_ptr + row * stride_x + d, mask=m, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(r_ptr + row * stride_r + d, mask=m, other=0.0).to(tl.float32))
        x = x.to(out_ptr.dtype.element_ty)
        tl.store(new_r_ptr + row * stride_nr + d, x, mask=m)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / D + eps)
    y = (xf * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + d, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + d, (y * w).to(out_ptr.dtype.element_ty), mask=m)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """x [..., D] -> out; with `residual` (same shape) -> (out, new_residual = x + residual)."""
    d = x.shape[-1]
    if weight.shape != (d,) or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"rmsnorm: x {tuple(x.shape)}, weight {tuple(weight.shape)}"
                         f"{'' if residual is None else f', residual {tuple(residual.shape)}'} disagree")
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    out = new_empty((rows, d), x.dtype, x.device)
    r2 = new_r = x2  # unused pointers without a residual
    if residual is not None:
        r2 = residual.reshape(-1, d)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        new_r = new_empty((rows, d), x.dtype, x.device)
    if rows:
        block_d = max(16, next_pow2(d))
        _rmsnorm_kernel[(rows,)](x2, r2, weight, out, new_r, d, eps, x2.stride(0), r2.stride(0),
                                 out.stride(0), new_r.stride(0), HAS_RESIDUAL=residual is not None,
                                 BLOCK_D=block_d, num_warps=min(16, max(1, block_d // 256)),
                                 **launch_options(x.device))
    out = out.view(x.shape)
    return out if residual is None else (out, new_r.view(x.shape))


def rmsnorm_ref(x, weight, eps, residual=None):
    """HF LlamaRMSNorm, after `x = x + residual` in x's dtype when a residual is given."""
    if residual is not None:
        x = (x.float() + residual.float()).to(x.dtype)
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    out = (weight.float() * y.float()).to(x.dtype)
    return out if residual is None else (out, x)
