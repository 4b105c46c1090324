"""Round-to-nearest (RTN): the baseline every table reports, and the inner quantizer of AWQ and GPTQ.

Conventions (the ones the AWQ and GPTQ checkpoints store, so codes pack without conversion):
  asymmetric: scale = (max - min) / (2**bits - 1), zero = round(-min / scale), clamped to the code range;
  symmetric:  scale = 2 * absmax / (2**bits - 1), zero = 2**(bits - 1) (GPTQ's `sym=True`);
  code = clamp(round(w / scale) + zero, 0, 2**bits - 1), w_hat = (code - zero) * scale.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.quant.qweight import QuantizedWeight

# 5 and 6 bits are for mixed-precision checkpoints (quant/mixed.py); uniform `--w-bits` keeps the
# widths every GPTQ reader takes (api.STANDARD_BITS)
SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
MIN_SCALE = 1e-8  # a group of equal weights: any positive scale reproduces it through the zero point


def check_bits(bits: int, where: str = "--w-bits", allowed: tuple[int, ...] = SUPPORTED_BITS) -> None:
    if bits not in allowed:
        raise LowbitError(f"{where} {bits}: supported bit widths are {', '.join(map(str, allowed))}")


def group_size_of(in_features: int, group_size: int) -> int:
    """The real group length: -1 (per output channel) means one group over the whole row."""
    return in_features if group_size == -1 else group_size


def scale_zero(w_min: torch.Tensor, w_max: torch.Tensor, bits: int, symmetric: bool):
    """Per-group (scale float32, zero int32) from the group's min and max (any matching shapes)."""
    max_code = 2 ** bits - 1
    w_min, w_max = w_min.float(), w_max.float()
    if symmetric:
        absmax = torch.maximum(w_min.abs(), w_max.abs())
        scale = (2 * absmax / max_code).clamp(min=MIN_SCALE)
        zero = torch.full_like(scale, 2 ** (bits - 1), dtype=torch.int32)
        return scale, zero
    # the range must hold 0 so that zero-padding and exact zeros stay exact (as AWQ/GPTQ do)
    w_min, w_max = w_min.clamp(max=0), w_max.clamp(min=0)
    scale = ((w_max - w_min) / max_code).clamp(min=MIN_SCALE)
    zero = torch.round(-w_min / scale).clamp(0, max_code).to(torch.int32)
    return scale, zero


def codes_for(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (int32, same shape as w) for weights and broadcastable scale / zero."""
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, 2 ** bits - 1).to(torch.int32)


# MSE range search: shrink [min, max] by p = 1, 0.99, ..., 1 - MSE_MAX_SHRINK and keep the p with the
# lowest sum |w - w_hat|^MSE_NORM per group. The grid step and the exponent 2.4 (above 2, so the few
# large weights are not given up for the many small ones) follow GPTQ's `--mse` option, the 20% range
# llm-compressor's `mse` observer. p = 1 is on the grid, so no group gets worse than min/max.
MSE_GRID = 100
MSE_MAX_SHRINK = 0.2
MSE_NORM = 2.4


def group_scale_zero(w_rows_k: torch.Tensor, bits: int, symmetric: bool, mse: bool = False):
    """(scale, zero) [rows] for groups w [rows, k]: from the group's min/max, or with `mse` from the
    shrunk range with the lowest reconstruction error (a grid search, see MSE_GRID)."""
    w = w_rows_k.float()
    w_min, w_max = w.amin(-1), w.amax(-1)
    scale, zero = scale_zero(w_min, w_max, bits, symmetric)
    if not mse:
        return scale, zero
    best_err = torch.full_like(scale, float("inf"))
    for i in range(int(MSE_MAX_SHRINK * MSE_GRID) + 1):
        p = 1 - i / MSE_GRID
        s, z = scale_zero(p * w_min, p * w_max, bits, symmetric)
        w_hat = (codes_for(w, s[..., None], z[..., None], bits) - z[..., None]) * s[..., None]
        err = (w_hat - w).abs().pow(MSE_NORM).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


def _grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    out_f, in_f = weight.shape
    gs = group_size_of(in_f, group_size)
    if in_f % gs:
        raise LowbitError(f"group size {group_size} does not divide in_features {in_f}")
    return weight.float().reshape(out_f, in_f // gs, gs)  # [out, n_groups, group]


def quantize_rtn(weight: torch.Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = False,
                 mse: bool = False) -> QuantizedWeight:
    """weight [out, in] -> QuantizedWeight with per-group min/max ranges (`mse`: searched ranges)."""
    check_bits(bits)
    w = _grouped(weight, group_size)
    scale, zero = group_scale_zero(w, bits, symmetric, mse)  # [out, n_groups]
    codes = codes_for(w, scale[..., None], zero[..., None], bits).reshape(weight.shape)
    return QuantizedWeight(codes=codes.to(torch.uint8), scales=scale, zeros=zero, bits=bits,
                           group_size=group_size, symmetric=symmetric)


def pseudo_quantize(weight: torch.Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = False) -> torch.Tensor:
    """quantize then dequantize, in the weight's own dtype and shape (AWQ's search objective)."""
    w = _grouped(weight, group_size)
    scale, zero = scale_zero(w.amin(-1, keepdim=True), w.amax(-1, keepdim=True), bits, symmetric)
    w_hat = (codes_for(w, scale, zero, bits) - zero) * scale
    return w_hat.reshape(weight.shape).to(weight.dtype)


def valid_group_sizes(in_features: list[int], candidates=(32, 64, 128, 256)) -> list[int]:
    return [g for g in candidates if all(n % g == 0 for n in in_features)] + [-1]


def check_group_size(in_features_by_layer: dict[str, int], group_size: int) -> None:
    """Refuse, before any work, a group size that does not divide every layer's input dimension."""
    if group_size == -1:
        return
    if group_size <= 0:
        raise LowbitError(f"--group-size {group_size}: expected a positive size or -1 (per output channel)")
    for name, in_f in in_features_by_layer.items():
        if in_f % group_size:
            valid = valid_group_sizes(list(in_features_by_layer.values()))
            raise LowbitError(f"{name}: --group-size {group_size} does not divide in_features {in_f}; "
                              f"valid group sizes for this model: {', '.join(map(str, valid))}")


@dataclass
class RTNMethod:
    """The driver's per-layer hook for RTN: no calibration, each linear rounded on its own."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    mse: bool = False
    needs_calibration: bool = False

    def quantize_layer(self, layer, inputs, prefix: str) -> dict[str, QuantizedWeight]:
        from lowbit.quant.driver import LINEAR_NAMES, set_weight

        out = {}
        for name in LINEAR_NAMES:
            linear = layer.get_submodule(name)
            out[name] = quantize_rtn(linear.weight.data, self.bits, self.group_size, self.symmetric, self.mse)
            set_weight(linear, out[name])
        return out
