"""How much each linear's output error costs the model: the second half of a mixed-precision
measurement.

The measurement's per-linear error (||X (W - Wq)^T||^2 / ||X W^T||^2) says how far a linear's output
moves, not what that does to the model: a relative error of 1e-3 in layer 0's q_proj and in a late
down_proj do not cost the same, and weighting the errors by the matrices' sizes (as the first
optimizer did) gave layer 0's q and o projections 2 bits and a worse model than uniform 4-bit
(README.md, "Mixed precision"). Here each linear's sensitivity is measured end to end:
the full-precision model runs on calibration tokens with Gaussian noise of relative power `rel_noise`
added to that one linear's output, and the KL divergence of its next-token distributions from the
clean model's, divided by rel_noise, is the linear's cost per unit of relative output error. The
optimizer then minimises the predicted KL, sum_i sensitivity_i * err_i (first order: errors small and
adding up independently).
"""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F

REL_NOISE = 1e-3  # about a 4-bit linear's output error: small enough for first order, far above fp32 noise
TOKENS = 1024  # calibration tokens a forward: 4.7 s each for the default model on 2 busy CPU cores


def sensitivity_windows(calib_ids: torch.Tensor) -> torch.Tensor:
    """The calibration windows the sensitivities are measured on: about TOKENS tokens, at least one window."""
    return calib_ids[:max(1, TOKENS // calib_ids.shape[1])]


@torch.no_grad()
def linear_sensitivities(net, calib_ids: torch.Tensor, keys: list[str], device: torch.device,
                         rel_noise: float = REL_NOISE, seed: int = 0,
                         log: Callable[[str], None] | None = print) -> dict[str, float]:
    """key -> mean KL (nats per token) of the next-token distribution when `rel_noise` relative noise
    is added to that linear's output, divided by rel_noise. `net`: the dense full-precision model."""
    ids = sensitivity_windows(calib_ids).to(device)
    home = next(net.parameters()).device
    net.to(device)
    try:
        ref = F.log_softmax(net(ids).float(), -1)
        ref_p = ref.exp()  # once, not per linear: [tokens, vocab]
        out, t0 = {}, time.time()
        for i, key in enumerate(keys):
            gen = torch.Generator(device=device).manual_seed(seed + i)

            def add_noise(_module, _inputs, y, gen=gen):
                scale = (rel_noise * y.float().pow(2).mean()).sqrt()
                return y + (scale * torch.randn(y.shape, generator=gen, device=y.device)).to(y.dtype)

            handle = net.get_submodule(key).register_forward_hook(add_noise)
            try:
                noisy = F.log_softmax(net(ids).float(), -1)
            finally:
                handle.remove()
            # (eval/kld.py's kl_full is the same sum; quant/ does not import eval/)
            kl = float((ref_p * (ref - noisy)).sum(-1).mean())
            out[key] = max(kl, 0.0) / rel_noise
            if log and (i + 1) % 20 == 0:
                log(f"sensitivity: {i + 1}/{len(keys)} linears ({time.time() - t0:.0f} s)")
        return out
    finally:
        net.to(home)
