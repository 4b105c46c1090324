"""SwiGLU's gate (Shazeer 2020) on a fused gate_up projection: x [..., 2I] (gate first, then up)
-> silu(gate) * up [..., I], in fp32 registers, one HBM pass."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels._common import interpreting, new_empty
from lowbit.kernels.pdl import launch_options, pdl_begin

_TRITON_INTERPRET = interpreting()


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, inter, stride_x, stride_o, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_begin(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < inter
    gate = tl.load(x_ptr + row * stride_x + offs, mask=m, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + offs, mask=m, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=m)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul: last dim {x.shape[-1]} must be even (gate and up halves)")
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * inter)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = new_empty((x2.shape[0], inter), x.dtype, x.device)
    if x2.shape[0] and inter:
        block = 1024 if inter >= 1024 else max(16, 1 << (inter - 1).bit_length())
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(inter, block))](x2, out, inter, x2.stride(0), out.stride(0),
                                                                       BLOCK=block, num_warps=4,
                                                                       **launch_options(x.device))
    return out.view(*x.shape[:-1], inter)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)
