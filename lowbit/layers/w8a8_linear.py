"""W8A8 linears (compressed-tensors int8 and FP8) as `LinearMethod`s, with their PyTorch reference.

Tensors by checkpoint name: `weight` int8 or float8_e4m3fn [out, in], `weight_scale` float32
[out, 1] (channel strategy) or one per shard (tensor strategy), and for static activations
`input_scale`, one per shard. y = (x_q @ w_q^T) * x_scale * w_scale + b, where x_q is x quantized
per token on the fly (dynamic) or with the stored per-tensor scale (static).

The int8 product is computed exactly as an int8 x int8 -> int32 tensor-core GEMM would: int8
values are integers of at most 2^7 in magnitude, so a float32 dot product over <= K_CHUNK columns
is an integer below 2^24 and every partial sum is exact in float32, in any summation order (FMA
included); the chunks are summed in int32. No compiler is needed, and the result is bit-exact to
the integer product (tests/test_w8a8.py checks it against an int64 computation). On a GPU int8
layers run the Triton GEMM of lowbit/kernels/w8a8.py (its own reference beside it; the same
integers, tests/test_kernels_w8a8.py); fp8 layers still run this reference there.
"""
from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats.compressed_tensors import FP8_E4M3_MAX, W8A8Scheme
from lowbit.formats.int8_activations import quantize_int8_per_token, quantize_int8_static
from lowbit.layers.linear import LinearMethod, register_method

K_CHUNK = 512  # 128 * 128 * 512 = 2^23 < 2^24: each float32 partial sum of int8 products is exact
FP8_MIN_SCALE = 1.0 / (FP8_E4M3_MAX * 512.0)  # floor of a per-token fp8 scale (vLLM's MIN_SCALING_FACTOR)


# ---- the reference ----------------------------------------------------------------------------
def quantize_fp8_per_token(x_mxk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic fp8 e4m3 per token: (values float8_e4m3fn [M, K], scale float32 [M])."""
    x = x_mxk.float()
    scale = (x.abs().amax(-1) / FP8_E4M3_MAX).clamp(min=FP8_MIN_SCALE)
    return (x / scale[:, None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn), scale


def quantize_fp8_static(x_mxk: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x_mxk.float() / scale.float()).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


def int8_matmul_ref(a_mxk: torch.Tensor, b_nxk_f32: torch.Tensor) -> torch.Tensor:
    """int32 [M, N] = a @ b^T for int8 a and int8-valued b (given as float32, as kept by the layer),
    exact (see the module docstring)."""
    a = a_mxk.float()
    k = a.shape[1]
    acc = None
    for k0 in range(0, k, K_CHUNK):
        part = nn.functional.linear(a[:, k0:k0 + K_CHUNK], b_nxk_f32[:, k0:k0 + K_CHUNK]).to(torch.int32)
        acc = part if acc is None else acc.add_(part)
    return acc


def w8a8_int8_ref(x_mxk: torch.Tensor, w_nxk_f32: torch.Tensor, w_scale_n: torch.Tensor,
                  x_scale: torch.Tensor | None = None) -> torch.Tensor:
    """float32 [M, N]: int8 activations (per token, or static with `x_scale`) times int8 weights,
    int32 accumulation, the per-token x per-channel scales applied in the epilogue."""
    if x_scale is None:
        xq, xs = quantize_int8_per_token(x_mxk)
        return int8_matmul_ref(xq, w_nxk_f32).float() * xs[:, None] * w_scale_n[None, :]
    xq = quantize_int8_static(x_mxk, x_scale)
    return int8_matmul_ref(xq, w_nxk_f32).float() * (x_scale.float() * w_scale_n[None, :])


def w8a8_fp8_ref(x_mxk: torch.Tensor, w_nxk_f32: torch.Tensor, w_scale_n: torch.Tensor,
                 x_scale: torch.Tensor | None = None) -> torch.Tensor:
    """float32 [M, N]: fp8 e4m3 activations times fp8 e4m3 weights (their float32 values), fp32
    accumulation as the tensor cores do, scales in the epilogue."""
    if x_scale is None:
        xq, xs = quantize_fp8_per_token(x_mxk)
        return nn.functional.linear(xq.float(), w_nxk_f32) * xs[:, None] * w_scale_n[None, :]
    xq = quantize_fp8_static(x_mxk, x_scale)
    return nn.functional.linear(xq.float(), w_nxk_f32) * (x_scale.float() * w_scale_n[None, :])


def fake_quantize_input(x: torch.Tensor, weight_type: str, x_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x with the rounding its quantization makes (in x's dtype): what quantizers search and measure
    against, equal to the layer's numerics up to float32 summation order."""
    x2 = x.reshape(-1, x.shape[-1])
    if weight_type == "int":
        if x_scale is None:
            q, s = quantize_int8_per_token(x2)
            return (q.float() * s[:, None]).to(x.dtype).view(x.shape)
        return (quantize_int8_static(x2, x_scale).float() * x_scale.float()).to(x.dtype).view(x.shape)
    if x_scale is None:
        q, s = quantize_fp8_per_token(x2)
        return (q.float() * s[:, None]).to(x.dtype).view(x.shape)
    return (quantize_fp8_static(x2, x_scale).float() * x_scale.float()).to(x.dtype).view(x.shape)


# ---- the LinearMethod -------------------------------------------------------------------------
class W8A8LinearMethod(LinearMethod):
    """A compressed-tensors W8A8 layer: int8 (`name` "w8a8") or fp8 e4m3 ("fp8") weights and activations."""

    def __init__(self, scheme: W8A8Scheme, prefix: str = ""):
        self.scheme, self.prefix = scheme, prefix
        self.name = "w8a8" if scheme.weight_type == "int" else "fp8"

    def create_weights(self, layer, dtype):
        n_shards = len(layer.shards) if layer.shards else 1
        wdtype = torch.int8 if self.scheme.weight_type == "int" else torch.float8_e4m3fn
        layer.register_buffer("weight", torch.empty(layer.out_features, layer.in_features, dtype=wdtype))
        scale_shape = (layer.out_features, 1) if self.scheme.weight_strategy == "channel" else (n_shards,)
        layer.register_buffer("weight_scale", torch.empty(scale_shape, dtype=torch.float32))
        if not self.scheme.act_dynamic:
            layer.register_buffer("input_scale", torch.empty(n_shards, dtype=torch.float32))

    def output_dim(self, tensor):
        return 0  # weight rows, channel scales and one per-tensor scale per shard all follow the outputs

    def after_load(self, layer):
        """The compute form: float32 per-channel scales [out] and, for static activations, one input
        scale (a merged layer's shards share an input: the largest scale of theirs, as vLLM does)."""
        ws = layer.weight_scale.float()
        if self.scheme.weight_strategy == "tensor":
            sizes = [n for _, n in layer.shards] if layer.shards else [layer.out_features]
            ws = torch.repeat_interleave(ws, torch.tensor(sizes, device=ws.device))
        if not torch.isfinite(ws).all() or (ws <= 0).any():
            raise LowbitError(f"{self.prefix}.weight_scale: scales must be finite and positive")
        layer.register_buffer("w_scale_n", ws.reshape(-1).contiguous(), persistent=False)
        x_scale = layer.input_scale.float().max().reshape(1) if not self.scheme.act_dynamic else None
        layer.register_buffer("x_scale_1", x_scale, persistent=False)
        layer.__dict__.pop("_w_f32", None)

    def select(self, layer, dim, index):
        index = index.to(layer.weight.device)
        layer.weight = layer.weight.index_select(dim, index).contiguous()
        if dim == 0:
            layer.w_scale_n = layer.w_scale_n[index].contiguous()
        layer.__dict__.pop("_w_f32", None)

    def _weight_f32(self, layer) -> torch.Tensor:
        """The codes as float32 (exact for int8 and fp8), made once per loaded weight: 4 bytes a weight
        beside the 1-byte codes, as the CPU path of packed formats keeps (cpu_weights.py)."""
        kept = layer.__dict__.get("_w_f32")
        w = layer.weight
        if kept is None or kept[0] is not w or kept[1] != w._version or kept[2].device != w.device:
            kept = (w, w._version, w.float())
            layer.__dict__["_w_f32"] = kept
        return kept[2]

    def apply(self, layer, x):
        if x.is_cuda and self.scheme.weight_type == "int":
            from lowbit.kernels.w8a8 import w8a8_int8_matmul  # Triton: only where there is a GPU

            return w8a8_int8_matmul(x, layer.weight, layer.w_scale_n, layer.bias, layer.x_scale_1)
        ref = w8a8_int8_ref if self.scheme.weight_type == "int" else w8a8_fp8_ref
        y = ref(x.reshape(-1, layer.in_features), self._weight_f32(layer), layer.w_scale_n, layer.x_scale_1)
        y = y.to(x.dtype).view(*x.shape[:-1], layer.out_features)
        return y + layer.bias if layer.bias is not None else y

    def dequantize(self, layer):
        return layer.weight.float() * layer.w_scale_n[:, None]


register_method("w8a8", W8A8LinearMethod)
