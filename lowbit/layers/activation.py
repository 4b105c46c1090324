"""SwiGLU's gate: silu(gate) * up (Shazeer 2020), on a fused gate_up output [..., 2I] (gate
first) or on the two halves. On a GPU the fused form is one kernel (lowbit.kernels.activation)."""
import torch
from torch.nn import functional as F


def silu_and_mul(gate_up: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    if up is None:
        if gate_up.is_cuda:
            from lowbit.kernels.activation import silu_and_mul as kernel

            return kernel(gate_up)
        gate_up, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate_up) * up
