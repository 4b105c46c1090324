"""RMSNorm (Zhang & Sennrich 2019): x / rms(x) * weight, computed in fp32 like the HF reference.

With `residual`, the add before the norm is fused in (vLLM's fused_add_rms_norm): one pass
returns (norm(x + residual), x + residual). On a GPU this is lowbit.kernels.rmsnorm, one launch
per call; elsewhere the same arithmetic in PyTorch (the kernel's reference)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if x.is_cuda:
            from lowbit.kernels.rmsnorm import rmsnorm

            return rmsnorm(x, self.weight, self.eps, residual)
        if residual is not None:
            x = (x.float() + residual.float()).to(x.dtype)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # PyTorch's fused op: the same fp32 arithmetic (bit-equal, tests/test_model_default.py)
            # in one call instead of six, ~18 us less on each of a CPU decode step's 61 norms
            y = F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        else:
            xf = x.float()
            y = self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return y if residual is None else (y, x)
