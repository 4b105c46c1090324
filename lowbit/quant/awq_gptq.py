"""AWQ + GPTQ: fold AWQ's activation-aware scales into each layer (exact in full precision), then
round the scaled weights with GPTQ instead of round-to-nearest. The scales shrink the relative
rounding error of the salient input channels; GPTQ then compensates what rounding error is left
with the Hessian of the (scaled) inputs each linear actually sees.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lowbit.quant.awq import N_GRID, scale_layer
from lowbit.quant.driver import LayerInputs
from lowbit.quant.gptq import GPTQMethod
from lowbit.quant.qweight import QuantizedWeight


@dataclass
class AWQGPTQMethod(GPTQMethod):
    n_grid: int = N_GRID
    duo: bool = True

    def quantize_layer(self, layer: nn.Module, inputs: LayerInputs, prefix: str) -> dict[str, QuantizedWeight]:
        scale_layer(layer, inputs, self.bits, self.group_size, self.symmetric, self.n_grid, self.duo)
        # GPTQ captures each linear's inputs again: they now come through the rescaled norms / producers
        return super().quantize_layer(layer, inputs, prefix)
