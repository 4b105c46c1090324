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

An engine decode step (`decode_step`: a call of at most HALF_MAX_ROWS rows, fp32 activations)
reads an fp16 copy of the weight instead (`half_linear`): of a packed layer's dequantized weight
(its rounding, under 2^-11 of a weight, is far below the 4-bit grid's), and of a dense weight only
where fp16 holds it exactly (checkpoints stored in fp16, e.g. the embeddings our quantizers write;
not the fp32 weights a GGUF dequantizes to, whose greedy tokens fp16 changed at the 4th token).
One token's matmuls read every weight once, so the step is bound by memory bandwidth, and fp16
halves the bytes. Measured on the 2-core AVX2 machine (`benchmarks/README.md`, "CPU decode"): the
quickstart's AWQ model decodes at 17-22 tokens/s instead of 8-11, its greedy tokens first differing
from the fp32 path's at token 17 of 128 on the quickstart prompt. The activations go in as fp16 and
the products come back as fp32; prompts and evaluation keep the exact fp32 weights, where fp16 would
be compute-bound (4.6x slower without fp16 arithmetic). $LOWBIT_CPU_DECODE=fp32 keeps decode in
fp32 too, exactly as before.

$LOWBIT_CPU_DECODE=int8 (opt-in) reads an int8 copy instead, one fp32 scale per output row
(symmetric, round to nearest), through PyTorch's int8 weight-only matmul
(`aten._weight_int8pack_mm`) with bf16 activations: a quarter of the fp32 bytes, and on a 2-core
AVX-512 machine 2.2-2.6x faster than the fp16 copy per matmul (576 x 3072: 100 against 222 us; the
576 x 49152 output head: 1.7 against 4.4 ms). It is not exact: the per-row int8 grid is ~16x finer
than a 4-bit group's, but bf16 activations keep 8 bits, so greedy tokens part from the fp32 path's
sooner than fp16's (benchmarks/README.md, "CPU decode", says where). Dense weights take the int8
copy too (the tied output head, SmolLM2's largest matmul).

What is kept is keyed by the tensors it was made from (`codes_nxk`, `scales_nxg`, `zeros_nxg`,
`g_idx_k`, `bias`: identity, storage and in-place version), so reloading the weights
(`after_load` registers new tensors) or changing them in place rebuilds it.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable

import torch
from torch import nn

from lowbit.errors import LowbitError

MODE_ENV = "LOWBIT_CPU_PACKED_LINEAR"
MODES = ("auto", "dequantize", "cache")
PATHS = {"dequantize": "torch dequantize + F.linear", "cache": "torch F.linear over the weight dequantized once"
         " (an fp16 copy for decode)"}
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


HALF_MAX_ROWS = 16
DECODE_ENV = "LOWBIT_CPU_DECODE"
DECODE_MODES = ("fp16", "fp32", "int8")
_DECODING: list[str | None] = [None]  # a stack: the engine's decode steps push their copy's kind (decode_step)


@contextlib.contextmanager
def decode_step(flag: bool = True):
    """Inside this scope (the engine's decode-only steps) small CPU matmuls may read fp16 copies,
    or int8 ones, as $LOWBIT_CPU_DECODE says (read here, once a step, not once a matmul; fp32:
    none)."""
    kind = None
    if flag:
        kind = os.environ.get(DECODE_ENV, "fp16")
        if kind not in DECODE_MODES:
            raise LowbitError(f"{DECODE_ENV}={kind!r}: expected one of {', '.join(DECODE_MODES)}")
    _DECODING.append(kind if kind != "fp32" else None)
    try:
        yield
    finally:
        _DECODING.pop()


def decode_copy(x: torch.Tensor) -> str | None:
    """"fp16" or "int8" where a CPU matmul of x reads that copy of its weight (see the module
    docstring), None where it reads the weight itself."""
    if x.dtype == torch.float32 and x.device.type == "cpu" and x.numel() <= HALF_MAX_ROWS * x.shape[-1]:
        return _DECODING[-1]
    return None


def int8_copy(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [out, in], bf16 [out] scales): symmetric per output row, round to nearest."""
    scale = weight.float().abs().amax(dim=1).clamp(min=1e-12) / 127.0
    codes = torch.round(weight.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return codes.contiguous(), scale.to(torch.bfloat16)


def int8_linear(x: torch.Tensor, kept: tuple[torch.Tensor, torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 x [..., in] through an int8 copy (int8_copy) with bf16 activations -> fp32, bias in fp32."""
    codes, scale = kept
    y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).bfloat16(), codes, scale)
    y = y.float().reshape(*x.shape[:-1], codes.shape[0])
    return y + bias if bias is not None else y


def _kept_on(weight: torch.Tensor, slot: str, make: Callable[[torch.Tensor], object]):
    """make(weight), kept on the tensor under `slot` and made again when it changes in place."""
    kept = weight.__dict__.get(slot)
    if kept is None or kept[0] != weight._version:
        weight.__dict__[slot] = kept = (weight._version, make(weight.detach()))
    return kept[1]


def dense_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 copy of a dense weight (int8_copy), kept on the tensor."""
    return _kept_on(weight, "_lowbit_int8", int8_copy)


def half_linear(x: torch.Tensor, weight16: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 x [..., in] times an fp16 weight [out, in] -> fp32, bias added in fp32."""
    y = nn.functional.linear(x.half(), weight16).float()
    return y + bias if bias is not None else y


def half_copy(weight: torch.Tensor) -> torch.Tensor | None:
    """An fp16 copy of a dense weight where fp16 holds it exactly (a checkpoint stored in fp16),
    else None; kept on the tensor."""

    def exact_half(w: torch.Tensor) -> torch.Tensor | None:
        w16 = w.half()
        return w16 if torch.equal(w16.float(), w) else None

    return _kept_on(weight, "_lowbit_fp16", exact_half)


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
    """The layer's kept dense weight in `dtype` (one per dtype), made again when the tensors it was
    made from changed."""
    slots = layer.__dict__.setdefault(_SLOT, {})
    entry = slots.get(dtype)
    if entry is None or not entry.fresh(layer, dtype):
        slots.pop(dtype, None)  # free the old one first
        value = make()
        # make() may unpack (re-register) the compute form: key what it was made from
        slots[dtype] = entry = _Kept(_sources(layer), dtype, value)
    return entry.value


def cpu_linear(layer, x: torch.Tensor, dequantize: Callable[[torch.dtype], torch.Tensor]) -> torch.Tensor:
    """y = x @ W^T + b for a packed layer on the CPU; `dequantize(dtype)` gives W [out, in]."""
    path = "dequantize" if mode() == "dequantize" else "cache"  # `auto` is `cache`
    copy = decode_copy(x) if path == "cache" else None
    if copy == "fp16":
        layer.__dict__["_cpu_linear_path"] = "cache-fp16"
        return half_linear(x, _kept(layer, torch.float16, lambda: dequantize(torch.float32).half()), layer.bias)
    if copy == "int8":
        layer.__dict__["_cpu_linear_path"] = "cache-int8"
        return int8_linear(x, _kept(layer, torch.int8, lambda: int8_copy(dequantize(torch.float32))), layer.bias)
    layer.__dict__["_cpu_linear_path"] = path  # what ran last, for reports
    if path == "cache":
        return nn.functional.linear(x, _kept(layer, x.dtype, lambda: dequantize(x.dtype)), layer.bias)
    return nn.functional.linear(x, dequantize(x.dtype), layer.bias)


def last_path(layer) -> str | None:
    """The path of the layer's last CPU call ("dequantize", "cache", "cache-fp16", "cache-int8"), None before one."""
    return layer.__dict__.get("_cpu_linear_path")


def drop_kept(layer) -> None:
    """Frees what the layer keeps for the CPU (made again on the next call)."""
    layer.__dict__.pop(_SLOT, None)
