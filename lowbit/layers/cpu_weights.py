"""The CPU matmul of AWQ / GPTQ layers (`PackedLinearMethod.apply` when x is on the CPU).

Dequantizing the weight on every call costs about twice the matmul itself, and a decode step is
one GEMV per layer, memory-bound. So, per call:

* decode (at most DECODE_ROWS rows of fp32 x) runs the int4 kernel of `cpu_int4.py` over the
  codes repacked once to half a byte a weight: ~4x less memory traffic than a dense fp32 GEMV.
* prompt chunks (more rows) dequantize on the fly, as before: one dequantize serves many rows,
  and nothing dense is kept.
* where that kernel cannot run (no C compiler, no AVX2, codes of more than 4 bits, act-order
  g_idx, a group size that is not a multiple of 32, x not fp32) the weight is dequantized once and
  kept: exactly the on-the-fly numerics, at 4 bytes a weight in fp32 (2 in fp16/bf16) beside the
  1-byte codes, e.g. 425 MB for SmolLM2-135M's 106M quantized weights, what a dense model holds.

$LOWBIT_CPU_PACKED_LINEAR picks a path for every call instead: `dequantize` (on the fly, the
reference the others are checked against), `cache` (dequantize once and keep); `auto` (default)
is the choice above.

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
from lowbit.layers import cpu_int4

DECODE_ROWS = 8  # the int4 kernel re-reads the weight per row: beyond ~8 rows one dequantize is cheaper
MODE_ENV = "LOWBIT_CPU_PACKED_LINEAR"
MODES = ("auto", "dequantize", "cache")
PATHS = {"int4": "cpu int4 kernel (lowbit.layers.cpu_int4)", "dequantize": "torch dequantize + F.linear",
         "cache": "torch F.linear over the weight dequantized once"}
_SLOTS = {"int4": "_cpu_int4_weight", "cache": "_cpu_dense_weight"}  # in layer.__dict__: a _Kept each


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


def _kept(layer, kind: str, dtype, make: Callable[[], object]):
    """The layer's kept value of `kind`, made again when the tensors it was made from changed."""
    slot = _SLOTS[kind]
    entry = layer.__dict__.get(slot)
    if entry is None or not entry.fresh(layer, dtype):
        layer.__dict__[slot] = None  # free the old one first
        value = make()
        # make() may unpack (re-register) the compute form: key what it was made from
        layer.__dict__[slot] = entry = _Kept(_sources(layer), dtype, value)
    return entry.value


def _int4_weight(layer) -> cpu_int4.Int4Weight | None:
    """The layer in the int4 kernel's form; None where the kernel does not take it."""
    codes, scales, zeros = layer.codes_nxk, layer.scales_nxg, layer.zeros_nxg
    group_size = codes.shape[1] // scales.shape[1]
    if layer.g_idx_k is not None or not cpu_int4.supports(codes, zeros, group_size):
        return None
    return cpu_int4.Int4Weight(cpu_int4.load(), codes, scales, zeros, layer.bias, group_size)


def _choose(layer, x: torch.Tensor) -> tuple[str, cpu_int4.Int4Weight | None]:
    """-> (the path for this x, the layer's int4 weight where that path is "int4")."""
    m = mode()
    if m != "auto":
        return m, None
    if x.dtype != torch.float32 or layer.codes_nxk is None or cpu_int4.load() is None:
        return "cache", None
    weight = _kept(layer, "int4", None, lambda: _int4_weight(layer))
    if weight is None:
        return "cache", None
    return ("int4", weight) if x.numel() <= DECODE_ROWS * x.shape[-1] else ("dequantize", None)


def path_for(layer, x: torch.Tensor) -> str:
    """Which path `cpu_linear` takes for this x: "int4", "dequantize" or "cache" (see PATHS)."""
    return _choose(layer, x)[0]


def cpu_linear(layer, x: torch.Tensor, dequantize: Callable[[torch.dtype], torch.Tensor]) -> torch.Tensor:
    """y = x @ W^T + b for a packed layer on the CPU; `dequantize(dtype)` gives W [out, in]."""
    kept = layer.__dict__.get(_SLOTS["int4"])
    # the decode step's case first, in as few Python operations as possible
    if (kept is not None and kept.value is not None and x.dtype == torch.float32
            and x.numel() <= DECODE_ROWS * kept.value.k and kept.fresh(layer, None) and mode() == "auto"):
        layer.__dict__["_cpu_linear_path"] = "int4"
        return kept.value(x)
    path, weight = _choose(layer, x)
    layer.__dict__["_cpu_linear_path"] = path  # what ran last, for reports
    if path == "int4":
        return weight(x)
    if path == "cache":
        return nn.functional.linear(x, _kept(layer, "cache", x.dtype, lambda: dequantize(x.dtype)), layer.bias)
    return nn.functional.linear(x, dequantize(x.dtype), layer.bias)


def last_path(layer) -> str | None:
    """The path of the layer's last CPU call ("int4", "dequantize", "cache"), None before one."""
    return layer.__dict__.get("_cpu_linear_path")


def drop_kept(layer) -> None:
    """Frees what the layer keeps for the CPU (made again on the next call)."""
    for slot in _SLOTS.values():
        layer.__dict__.pop(slot, None)
