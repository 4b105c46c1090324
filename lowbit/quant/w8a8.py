"""8-bit weights and activations: int8 (W8A8) and fp8 e4m3 weights per output channel, and the
driver hooks of plain W8A8 (no smoothing: the baseline SmoothQuant is measured against) and FP8.

Weights: symmetric per output channel, scale = max|w_row| / 127 (int8, codes in [-127, 127]) or
max|w_row| / 448 (fp8 e4m3, the largest finite value), stored as compressed-tensors' `weight` and
`weight_scale` [out, 1]. Activations are quantized at run time per token (dynamic) or with one
calibrated scale per tensor (static, `input_scale` = max|x| / 127 over the calibration tokens).

After a layer is quantized its linears hold the dequantized weights and a forward pre-hook that
rounds their input as the checkpoint's layers will (`fake_quantize_input`), so the driver's
per-layer error and the next layer's inputs see the activation rounding too; the returned model
computes what the written checkpoint computes, up to float32 summation order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowbit.formats.compressed_tensors import FP8_E4M3_MAX, INT8_MAX, W8A8Scheme
from lowbit.layers.w8a8_linear import fake_quantize_input

INPUT_SCALE_MIN = 1e-8


@dataclass
class W8Weight:
    """One linear's 8-bit weight as compressed-tensors stores it."""

    weight: torch.Tensor  # int8 or float8_e4m3fn [out, in]
    weight_scale: torch.Tensor  # float32 [out, 1]
    input_scale: torch.Tensor | None = None  # float32 [1], static activations only

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale


def quantize_weight(w_nxk: torch.Tensor, weight_type: str) -> W8Weight:
    """Symmetric per-output-channel int8 ("int") or fp8 e4m3 ("float") weights."""
    w = w_nxk.float()
    absmax = w.abs().amax(-1, keepdim=True)  # [out, 1]
    if weight_type == "int":
        scale = (absmax / INT8_MAX).clamp(min=1e-12)
        return W8Weight(torch.round(w / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale)
    scale = (absmax / FP8_E4M3_MAX).clamp(min=1e-12)
    return W8Weight((w / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn), scale)


def pseudo_quantize_weight(w_nxk: torch.Tensor, weight_type: str) -> torch.Tensor:
    """quantize then dequantize, in w's dtype (the searches' objective)."""
    return quantize_weight(w_nxk, weight_type).dequantize().to(w_nxk.dtype)


def static_input_scale(x_batches: list[torch.Tensor], weight_type: str) -> torch.Tensor:
    """float32 [1]: max |x| over every calibration token / the code range (per-tensor, static)."""
    absmax = max(float(x.abs().max()) for x in x_batches)
    top = INT8_MAX if weight_type == "int" else FP8_E4M3_MAX
    return torch.tensor([max(absmax / top, INPUT_SCALE_MIN)])


class InputRounding:
    """A forward pre-hook that gives a linear the input rounding of its W8A8 checkpoint layer;
    `scale_in` (optional) divides the input first, as a smoothing scale not yet folded would."""

    def __init__(self, weight_type: str, x_scale: torch.Tensor | None = None, scale_in: torch.Tensor | None = None):
        self.weight_type, self.x_scale, self.scale_in = weight_type, x_scale, scale_in

    def __call__(self, _module, args):
        x = args[0] if self.scale_in is None else args[0] / self.scale_in.to(args[0].dtype)
        return (fake_quantize_input(x, self.weight_type, self.x_scale), *args[1:])


def attach_input_rounding(linear: nn.Module, weight_type: str, x_scale: torch.Tensor | None) -> None:
    """Installs (once) the pre-hook that rounds this linear's input as its checkpoint layer will."""
    old = linear.__dict__.pop("_w8a8_input_hook", None)
    if old is not None:
        old.remove()
    x_scale = None if x_scale is None else x_scale.to(linear.weight.device)
    linear.__dict__["_w8a8_input_hook"] = linear.register_forward_pre_hook(InputRounding(weight_type, x_scale))


def quantize_linears(layer: nn.Module, names: list[str], weight_type: str, inputs_by_name: dict | None = None
                     ) -> dict[str, W8Weight]:
    """Quantize the named linears of one layer in place: the dense weight becomes the dequantized one
    and the input rounding is attached; static activations take their scale from `inputs_by_name`
    (captured inputs by linear name), dynamic ones when it is None."""
    out = {}
    for name in names:
        linear = layer.get_submodule(name)
        qw = quantize_weight(linear.weight.data, weight_type)
        if inputs_by_name is not None:
            qw.input_scale = static_input_scale(inputs_by_name[name], weight_type)
        linear.weight.data.copy_(qw.dequantize().to(linear.weight.dtype))
        attach_input_rounding(linear, weight_type, qw.input_scale)
        out[name] = qw
    return out


@dataclass
class W8A8Method:
    """The driver's hook for plain W8A8 (int) or FP8 (float): round each linear on its own, no
    smoothing. Needs calibration only for static activation scales."""

    scheme: W8A8Scheme
    next_inputs_fp: bool = False

    @property
    def needs_calibration(self) -> bool:
        return not self.scheme.act_dynamic

    def quantize_layer(self, layer, inputs, prefix: str) -> dict[str, W8Weight]:
        from lowbit.quant.driver import LINEAR_NAMES

        captured = None
        if not self.scheme.act_dynamic:
            captured = {n: [] for n in LINEAR_NAMES}
            inputs.capture(layer, LINEAR_NAMES, lambda n, x: captured[n].append(x.clone()))
        return quantize_linears(layer, LINEAR_NAMES, self.scheme.weight_type, captured)
