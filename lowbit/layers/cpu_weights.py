"""The CPU matmul of AWQ / GPTQ layers (`PackedLinearMethod.apply` when x is on the CPU).

Dequantizing the weight on every call cost twice the matmul itself (the quickstart's 4-bit model
answered at ~7 tokens/s on 2 cores). By default the weight is dequantized once and kept: exactly
the on-the-fly numerics (the same greedy tokens), at 4 bytes a weight in fp32 (2 in fp16/bf16)
beside the 1-byte codes, e.g. 425 MB for SmolLM2-135M's 106M quantized weights, what a dense model
holds. Everything here is PyTorch: the CPU path needs no compiler. (PyTorch's own CPU int4 matmul,
`aten._weight_int4pack_mm_for_cpu`, takes ~8 ms for one 1536x576 product with fp32 activations on
an AVX2 machine, and its fast path rounds activations and scales to bf16.)

$LOWBIT_CPU_PACKED_LINEAR picks a path: `cache` (default; `auto` is the same) or `dequantize`
(on the fly, nothing kept: the reference the cache is checked against, and the choice where
memory is short).

What is kept is keyed by the tensors it was made from (`codes_nxk`, `scales_nxg`, `zeros_nxg`,
`g_idx_k`, `bias`: identity, storage and in-place version), so reloading the weights
(`after_load` registers new tensors) or changing them in place rebuilds it.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
from torch import nn

from lowbit.errors import LowbitError

MODE_ENV = "LOWBIT_CPU_PACKED_LINEAR"
MODES = ("auto", "dequantize", "cache")
PATHS = {"dequantize": "torch dequantize + F.linear", "cache": "torch F.linear over the weight dequantized once"}
_SLOT = "_cpu_dense_weight"  # in layer.__dict__: a _Kept


def mode() -> str:
    m = os.environ.get(MODE_ENV, "auto")
    if m not in MODES:
        raise LowbitError(f"{MODE_ENV}={m!r}: expected one of {', '.join(MODES)}")
    return m


def _sources(layer) -> tuple:
    """The tensors a kept weight is made from (read from the module's dicts: this runs per call)."""
    b = layer._buffers
    return b.get("codes_nxk"), b.get("scales_nxg"), b.get("zeros_nxg"), b.get("g_idx_k"), layer._parameters.get("bias")


def _versions(sources: tuple) -> tuple:
    return tuple(None if t is None else t._version for t in sources)


class _Kept:
    __slots__ = ("sources", "versions", "dtype", "value")

    def __init__(self, sources, dtype, value):
        self.sources, self.versions, self.dtype, self.value = sources, _versions(sources), dtype, value

    def fresh(self, layer, dtype) -> bool:
        now = _sources(layer)
        src = self.sources
        return (dtype == self.dtype and now[0] is src[0] and now[1] is src[1] and now[2] is src[2]
                and now[3] is src[3] and now[4] is src[4] and _versions(now) == self.versions)


def _kept(layer, dtype, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The layer's kept dense weight, made again when the tensors it was made from changed."""
    entry = layer.__dict__.get(_SLOT)
    if entry is None or not entry.fresh(layer, dtype):
        layer.__dict__[_SLOT] = None  # free the old one first
        value = make()
        # make() may unpack (re-register) the compute form: key what it was made from
        layer.__dict__[_SLOT] = entry = _Kept(_sources(layer), dtype, value)
    return entry.value


def cpu_linear(layer, x: torch.Tensor, dequantize: Callable[[torch.dtype], torch.Tensor]) -> torch.Tensor:
    """y = x @ W^T + b for a packed layer on the CPU; `dequantize(dtype)` gives W [out, in]."""
    path = "dequantize" if mode() == "dequantize" else "cache"  # `auto` is `cache`
    layer.__dict__["_cpu_linear_path"] = path  # what ran last, for reports
    if path == "cache":
        return nn.functional.linear(x, _kept(layer, x.dtype, lambda: dequantize(x.dtype)), layer.bias)
    return nn.functional.linear(x, dequantize(x.dtype), layer.bias)


def last_path(layer) -> str | None:
    """The path of the layer's last CPU call ("dequantize", "cache"), None before one."""
    return layer.__dict__.get("_cpu_linear_path")


def drop_kept(layer) -> None:
    """Frees what the layer keeps for the CPU (made again on the next call)."""
    layer.__dict__.pop(_SLOT, None)
