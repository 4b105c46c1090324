"""SwiGLU's gate: silu(gate) * up (Shazeer 2020)."""
import torch
from torch.nn import functional as F


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up
