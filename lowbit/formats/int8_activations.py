"""compressed-tensors' int8 input activations (symmetric, per token or one static scale) as codes,
in plain PyTorch: the one rule that the W8A8 layer's CPU path (lowbit/layers/w8a8_linear.py) runs
and that the Triton kernel (lowbit/kernels/w8a8.py) is checked against, so the two cannot drift
apart. No Triton here: the CPU path imports it."""
from __future__ import annotations

import torch

from lowbit.formats.compressed_tensors import INT8_MAX

INT8_MIN_SCALE = 1e-10  # an all-zero token: any positive scale gives codes of 0


def quantize_int8_per_token(x_mxk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 per token: (codes int8 [M, K], scale float32 [M]); x ~ codes * scale."""
    x = x_mxk.float()
    scale = (x.abs().amax(-1) / INT8_MAX).clamp(min=INT8_MIN_SCALE)
    return torch.round(x / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def quantize_int8_static(x_mxk: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Static symmetric int8 with one calibrated scale: values beyond 128 steps are clipped."""
    return torch.round(x_mxk.float() / scale.float()).clamp(-INT8_MAX - 1, INT8_MAX).to(torch.int8)
