"""One quantized-linear abstraction for every weight format.

A `LinearMethod` (vLLM's quant-method idea) owns a format: it creates the layer's tensors under
the names the checkpoint uses, and applies the matmul. `QLinear` is the module the model holds;
the model never learns which method is inside. New formats register with `register_method`.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from lowbit.errors import LowbitError


class LinearMethod:
    """A weight format: which tensors a layer holds, and how `y = x @ W^T + b` is computed."""

    name = "base"

    def create_weights(self, layer: "QLinear", dtype: torch.dtype) -> None:
        raise NotImplementedError

    def apply(self, layer: "QLinear", x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self, layer: "QLinear") -> torch.Tensor:
        """The dense [out, in] weight this layer represents (for checks and re-quantization)."""
        raise NotImplementedError

    def after_load(self, layer: "QLinear") -> None:
        """Called once all tensors are loaded: repack for a kernel, drop what is not needed."""


class DenseMethod(LinearMethod):
    """fp32 / fp16 / bf16 weights, `weight` [out, in] as in every HF checkpoint."""

    name = "dense"

    def create_weights(self, layer, dtype):
        layer.weight = nn.Parameter(torch.empty(layer.out_features, layer.in_features, dtype=dtype), requires_grad=False)

    def apply(self, layer, x):
        return nn.functional.linear(x, layer.weight, layer.bias)

    def dequantize(self, layer):
        return layer.weight.data


_METHODS: dict[str, Callable[..., LinearMethod]] = {"dense": DenseMethod}


def register_method(name: str, factory: Callable[..., LinearMethod]) -> None:
    _METHODS[name] = factory


def make_method(name: str, **kwargs) -> LinearMethod:
    if name not in _METHODS:
        raise LowbitError(f"weight format {name!r} is not known; known: {', '.join(sorted(_METHODS))}")
    return _METHODS[name](**kwargs)


class QLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, method: LinearMethod | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.method = method or DenseMethod()
        self.method.create_weights(self, dtype)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)

    def dequantized_weight(self) -> torch.Tensor:
        return self.method.dequantize(self)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, format={self.method.name}"
