"""The GPTQ layout as AutoGPTQ and GPTQModel write it (`checkpoint_format: "gptq"`, a.k.a. v1).

    qweight  int32 [in * bits / 32, out]         codes packed along the input dimension
    qzeros   int32 [n_groups, out * bits / 32]   zero - 1 (v1), packed along the output dimension
    scales   fp16  [n_groups, out]               w = (code - zero) * scale[g_idx[input row]]
    g_idx    int32 [in]                          group of each input row (a permutation with act-order)

Packing: each run of 32 values fills `bits` int32 words as one little-endian bit stream, value j
at stream bit bits * j. For 2/4/8 bits that is value j of a word at shift bits * j; for 3 bits,
values 10 and 21 straddle word boundaries (AutoGPTQ's 3-bit scheme: 10 values at shifts 0..27,
value 10's low two bits at 30 and its high bit in bit 0 of the next word, ...).
5 and 6 bits are a lowbit extension of the same stream (32 values in 5 or 6 words; 5-bit value 6
starts at bit 30 and spills 3 bits into the next word): AutoGPTQ, GPTQModel and transformers take
2/3/4/8 only, so only `quantize mixed` writes them, for the linears it gives 5 or 6 bits.
Checked against AutoGPTQ `auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py` (QuantLinear.pack, and
the `wf` shift tables of its torch dequantize path), vLLM
`vllm/model_executor/layers/quantization/gptq.py` (shapes, `zeros + 1`, g_idx indexing), and
transformers `utils/quantization_config.py` (GPTQConfig: bits 2/3/4/8, `checkpoint_format`).

The v1 "minus one": writers store zero - 1 and readers add 1 back. An asymmetric zero of 0 would
store -1; we mask it to `bits` bits and read with `(stored + 1) mod 2**bits`, which returns 0.
Nobody agrees on that case: AutoGPTQ ORs the unmasked -1 into the word (corrupting its neighbours),
nibble-wise readers (AutoGPTQ, vLLM's exllama path) decode our masked value as 2**bits, and
GPTQModel (`gptqmodel/utils/model.py`, convert_gptq_v2_to_v1_format) subtracts 0x11111111 from the
whole word, borrowing from the next value, and adds it back word-wise on load. Symmetric zeros
(2**(bits-1)) never hit it. GPTQModel's `gptq_v2` stores zeros as they are; we read it.
"""
from __future__ import annotations

import torch

from lowbit.errors import LowbitError

BITS = (2, 3, 4, 5, 6, 8)
FORMATS = {"gptq": 1, "gptq_v2": 0}  # checkpoint_format -> what was subtracted from each zero


def _to_int32(words_i64: torch.Tensor) -> torch.Tensor:
    return torch.where(words_i64 >= 2 ** 31, words_i64 - 2 ** 32, words_i64).to(torch.int32)


def _check(n: int, bits: int, what: str) -> None:
    if bits not in BITS:
        raise LowbitError(f"gptq layout: {bits}-bit codes are not stored; it holds {', '.join(map(str, BITS))}")
    if n % 32:
        raise LowbitError(f"gptq layout: {what} {n} is not a multiple of 32, so {bits}-bit codes do not fill whole words")


def pack_last(values: torch.Tensor, bits: int) -> torch.Tensor:
    """int [..., n] -> int32 [..., n * bits / 32]: runs of 32 values as `bits`-word bit streams."""
    *lead, n = values.shape
    _check(n, bits, "packed dimension")
    v = (values.to(torch.int64) & (2 ** bits - 1)).reshape(*lead, n // 32, 32)
    words = torch.zeros(*lead, n // 32, bits, dtype=torch.int64, device=values.device)
    for j in range(32):
        word, shift = divmod(bits * j, 32)
        words[..., word] |= (v[..., j] << shift) & 0xFFFFFFFF
        if shift + bits > 32:  # the high bits spill into the next word (3-bit values 10 and 21)
            words[..., word + 1] |= v[..., j] >> (32 - shift)
    return _to_int32(words.reshape(*lead, n // 32 * bits))


def unpack_last(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [..., w] -> int32 [..., w * 32 / bits], the inverse of `pack_last`."""
    *lead, w = packed.shape
    if bits not in BITS or w % bits:
        raise LowbitError(f"gptq layout: {w} words do not hold whole runs of 32 {bits}-bit values")
    words = (packed.to(torch.int64) & 0xFFFFFFFF).reshape(*lead, w // bits, bits)
    out = torch.empty(*lead, w // bits, 32, dtype=torch.int64, device=packed.device)
    mask = 2 ** bits - 1
    for j in range(32):
        word, shift = divmod(bits * j, 32)
        v = words[..., word] >> shift
        if shift + bits > 32:
            v = v | (words[..., word + 1] << (32 - shift))
        out[..., j] = v & mask
    return out.reshape(*lead, w // bits * 32).to(torch.int32)


def natural_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    gs = in_features if group_size == -1 else group_size
    return (torch.arange(in_features) // gs).to(torch.int32)


def pack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
         g_idx: torch.Tensor | None = None, zero_offset: int = 1) -> dict[str, torch.Tensor]:
    """codes uint8 [out, in], scales f32 [out, G], zeros int32 [out, G] -> the checkpoint tensors.
    zero_offset 1 writes v1 (`gptq`), 0 writes `gptq_v2`."""
    out_f, in_f = codes.shape
    _check(in_f, bits, "in_features")
    _check(out_f, bits, "out_features")
    return {"qweight": pack_last(codes, bits).T.contiguous(),
            "qzeros": pack_last((zeros.T.to(torch.int64) - zero_offset) & (2 ** bits - 1), bits),
            "scales": scales.T.to(torch.float16).contiguous(),
            "g_idx": (natural_g_idx(in_f, group_size) if g_idx is None else g_idx).to(torch.int32)}


def unpack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int,
           zero_offset: int = 1):
    """The checkpoint tensors -> (codes uint8 [out, in], scales [out, G] as stored, zeros int32 [out, G],
    g_idx int32 [in])."""
    codes = unpack_last(qweight.T.contiguous(), bits).to(torch.uint8)
    zeros = (unpack_last(qzeros, bits) + zero_offset) & (2 ** bits - 1)
    return codes, scales.T.contiguous(), zeros.T.contiguous(), g_idx.to(torch.int32)


def shapes(in_features: int, out_features: int, bits: int, group_size: int) -> dict[str, tuple[int, ...]]:
    n_groups = 1 if group_size == -1 else in_features // group_size
    return {"qweight": (in_features * bits // 32, out_features), "qzeros": (n_groups, out_features * bits // 32),
            "scales": (n_groups, out_features), "g_idx": (in_features,)}


def bits_on_disk(in_features: int, out_features: int, bits: int, group_size: int) -> int:
    """What one linear costs in this layout: the codes, and per group an fp16 scale and a `bits`-wide
    zero (qweight, scales, qzeros; the int32 g_idx, one per input row, is left out). The bits per
    weight that `quantize mixed` budgets and `lowbit info` reports."""
    gs = in_features if group_size == -1 else group_size
    return out_features * in_features * bits + out_features * (in_features // gs) * (16 + bits)
