"""AutoAWQ's GEMM layout (`quantization_config.version: "gemm"`): 4-bit codes packed along the
output dimension, eight to an int32, in an interleaved nibble order.

    qweight  int32 [in, out / 8]          nibble i (bits 4i..4i+3) of word c holds output column 8c + AWQ_ORDER[i]
    qzeros   int32 [n_groups, out / 8]    the zero points (stored as is), packed the same way
    scales   fp16  [n_groups, out]        w = (code - zero) * scale, group = input row // group_size

Checked against AutoAWQ `awq/modules/linear/gemm.py` (WQLinear_GEMM.from_linear: `order_map =
[0, 2, 4, 6, 1, 3, 5, 7]`, `qweight[:, col] |= intweight[:, col * 8 + order_map[i]] << (i * 4)`)
and `awq/utils/packing_utils.py` (AWQ_REVERSE_ORDER, dequantize_gemm), and vLLM
`vllm/model_executor/layers/quantization/awq.py` (the same tensor names and shapes). Per-channel
(group_size -1) is one group spanning the whole input dimension, as WQLinear_GEMM treats it.
"""
from __future__ import annotations

import torch

from lowbit.errors import LowbitError

BITS = (4,)  # the GEMM layout and its kernels are 4-bit only (WQLinear_GEMM raises otherwise)
PACK = 8  # codes per int32
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i holds column AWQ_ORDER[i] of its block of 8
_COLUMN_TO_NIBBLE = tuple(AWQ_ORDER.index(c) for c in range(PACK))  # (0, 4, 1, 5, 2, 6, 3, 7)


def _to_int32(words_i64: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words held in int64 -> int32 with the same bits (two's complement)."""
    return torch.where(words_i64 >= 2 ** 31, words_i64 - 2 ** 32, words_i64).to(torch.int32)


def pack_cols(values: torch.Tensor) -> torch.Tensor:
    """int [rows, cols] 4-bit values -> int32 [rows, cols / 8] in AWQ order."""
    rows, cols = values.shape
    if cols % PACK:
        raise LowbitError(f"awq layout: {cols} output columns is not a multiple of {PACK}")
    blocks = (values.to(torch.int64) & 0xF).reshape(rows, cols // PACK, PACK)[..., list(AWQ_ORDER)]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=values.device)
    return _to_int32((blocks << shifts).sum(-1))  # nibbles never overlap, so sum == or


def unpack_cols(packed: torch.Tensor) -> torch.Tensor:
    """int32 [rows, words] -> int32 [rows, words * 8] values in natural column order."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed[..., None] >> shifts) & 0xF  # [rows, words, 8], nibble i = column AWQ_ORDER[i]
    return nibbles[..., list(_COLUMN_TO_NIBBLE)].reshape(packed.shape[0], -1)


def pack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> dict[str, torch.Tensor]:
    """codes uint8 [out, in], scales f32 [out, G], zeros int32 [out, G] -> the checkpoint tensors."""
    return {"qweight": pack_cols(codes.T),
            "qzeros": pack_cols(zeros.T),
            "scales": scales.T.to(torch.float16).contiguous()}


def unpack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor):
    """The checkpoint tensors -> (codes uint8 [out, in], scales [out, G] as stored, zeros int32 [out, G])."""
    codes = unpack_cols(qweight).T.to(torch.uint8).contiguous()
    zeros = unpack_cols(qzeros).T.contiguous()
    return codes, scales.T.contiguous(), zeros


def shapes(in_features: int, out_features: int, group_size: int) -> dict[str, tuple[int, ...]]:
    n_groups = 1 if group_size == -1 else in_features // group_size
    return {"qweight": (in_features, out_features // PACK), "qzeros": (n_groups, out_features // PACK),
            "scales": (n_groups, out_features)}
