"""Rotary position embeddings (Su et al. 2021) in the HF "rotate half" layout, with the
`linear`, `dynamic` (NTK) and `llama3` frequency scalings that HF configs name."""
from __future__ import annotations

import math

import torch
from torch import nn


def base_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    # Llama 3.1's band-wise scaling: long wavelengths divided by `factor`, short ones kept,
    # a linear blend between (Meta's reference `apply_scaling`).
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float, scaling: dict | None, max_position: int):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.scaling = scaling or {}
        self.kind = self.scaling.get("rope_type")
        self.max_position = self.scaling.get("original_max_position_embeddings", max_position)
        inv = base_inv_freq(head_dim, theta)
        if self.kind == "linear":
            inv = inv / self.scaling["factor"]
        elif self.kind == "llama3":
            inv = llama3_inv_freq(inv, self.scaling)
        self.register_buffer("inv_freq", inv.float(), persistent=False)

    def _inv_freq_for(self, positions: torch.Tensor) -> torch.Tensor:
        if self.kind != "dynamic":
            return self.inv_freq
        # NTK-aware dynamic scaling: grow the base once the sequence passes the trained length.
        seq_len = int(positions.max()) + 1
        if seq_len <= self.max_position:
            return self.inv_freq
        f = self.scaling["factor"]
        d = self.head_dim
        theta = self.theta * ((f * seq_len / self.max_position) - (f - 1)) ** (d / (d - 2))
        return base_inv_freq(d, theta).float().to(positions.device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [...]: returns cos, sin [..., head_dim]."""
        freqs = positions.float()[..., None] * self._inv_freq_for(positions).to(positions.device)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q [B, T, H, D], k [B, T, KVH, D]; cos, sin [B, T, D] -> rotated (q, k). On a GPU one kernel
    rotates both in place (they may be views into a fused qkv output); elsewhere new tensors."""
    if q.is_cuda:
        from lowbit.kernels.rotary import rotary_cos_sin

        b, t = q.shape[:2]
        cos, sin = (c.expand(b, t, -1).reshape(b * t, -1) for c in (cos, sin))  # calibration shares one row set
        rotary_cos_sin(q.view(b * t, *q.shape[2:]), k.view(b * t, *k.shape[2:]), cos, sin)
        return q, k
    cos, sin = cos[:, :, None], sin[:, :, None]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
