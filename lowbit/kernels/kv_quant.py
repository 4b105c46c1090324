"""KV-cache quantization, the format every KV kernel and the paged cache agree on (PyTorch reference).

Asymmetric, per token and per KV head, as LMDeploy quantizes its KV cache: for the head_dim values
x of one (token, head), zero = (min + max) / 2 and scale = (max - min) / (2**bits - 1), so the codes
q = round((x - zero) / scale) + 2**(bits - 1) fill [0, 2**bits - 1] and x_hat = (q - 2**(bits-1))
* scale + zero. Storing the midpoint (not min) as the zero keeps the code of x = zero at the centre.

Layouts (a block of the paged cache, per layer, for K and for V alike):
  kv_bits 8: codes uint8 [num_blocks, block_size, kv_heads, head_dim]
  kv_bits 4: codes uint8 [num_blocks, block_size, kv_heads, head_dim // 2], dim 2i in the low
             nibble and dim 2i+1 in the high nibble
  scale_zero float16 [num_blocks, block_size, kv_heads, 2] (scale, zero) beside the codes.
fp16 scale/zero cost 4 bytes per token and head: int8 holds 2 * hd / (hd + 4) times as many tokens
as fp16 (1.94x at head_dim 128), int4 4 * hd / (hd + 8) (3.76x).
"""
from __future__ import annotations

import torch

KV_BITS = (8, 4)
MIN_SCALE = 1e-6  # a constant (token, head) vector: any positive scale reproduces it through the zero


def packed_head_dim(head_dim: int, kv_bits: int) -> int:
    return head_dim if kv_bits == 8 else head_dim // 2


def quantize_kv_ref(x: torch.Tensor, kv_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., head_dim] (float) -> (codes uint8 [..., packed_head_dim], scale_zero fp16 [..., 2])."""
    if kv_bits not in KV_BITS:
        raise ValueError(f"kv_bits {kv_bits}: expected one of {KV_BITS}")
    xf = x.float()
    lo, hi = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
    max_code = 2 ** kv_bits - 1
    # round scale/zero to fp16 first, so the codes are computed with the values that are stored
    scale = ((hi - lo) / max_code).clamp(min=MIN_SCALE).half().float()
    zero = ((lo + hi) / 2).half().float()
    q = torch.clamp(torch.round((xf - zero) / scale) + 2 ** (kv_bits - 1), 0, max_code).to(torch.uint8)
    if kv_bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return q, torch.cat([scale, zero], -1).half()


def dequantize_kv_ref(codes: torch.Tensor, scale_zero: torch.Tensor, kv_bits: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(codes uint8 [..., packed_head_dim], scale_zero fp16 [..., 2]) -> [..., head_dim] in dtype."""
    if kv_bits == 4:
        lo, hi = codes & 0xF, codes >> 4
        codes = torch.stack([lo, hi], -1).flatten(-2)
    scale, zero = scale_zero[..., :1].float(), scale_zero[..., 1:].float()
    return ((codes.float() - 2 ** (kv_bits - 1)) * scale + zero).to(dtype)
