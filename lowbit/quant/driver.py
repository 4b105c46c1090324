"""The calibration driver shared by every method: walk the decoder one layer at a time.

Capture the inputs of layer 0 (the embeddings of the calibration windows); then for each layer:
move it to the compute device, let the method quantize its linears from the captured inputs
(forward hooks give each linear's own inputs), put the dequantized weights back, run the
*quantized* layer to make the next layer's inputs (GPTQ's true-sequential mode: error made early
is seen, and compensated, later; a method with `next_inputs_fp` takes the layer's full-precision
outputs instead, as llm-awq and AutoAWQ do), and move the layer back. Peak memory is one layer plus
the calibration activations (inputs, fp outputs for the error figure, quantized outputs).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

import torch
from torch import nn

from lowbit.quant.qweight import QuantizedWeight

# The linears of a decoder layer in the order their inputs become available (true-sequential, GPTQ
# repository `--true-sequential`): q/k/v read the first norm, o reads attention, gate/up the second
# norm, down the gated product.
SEQUENTIAL_GROUPS: list[list[str]] = [
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ["self_attn.o_proj"],
    ["mlp.gate_proj", "mlp.up_proj"],
    ["mlp.down_proj"],
]
LINEAR_NAMES = [n for group in SEQUENTIAL_GROUPS for n in group]


class _StopForward(Exception):
    """Raised from a hook once every linear of interest has seen its input: the rest of the layer
    would be wasted work."""


@dataclass
class LayerInputs:
    """The calibration activations entering one layer, in batches on the compute device."""

    hidden: list[torch.Tensor]  # each [batch, seqlen, hidden]
    cos: torch.Tensor  # [1, seqlen, head_dim], broadcast over the batch
    sin: torch.Tensor

    def forward(self, layer: nn.Module) -> list[torch.Tensor]:
        with torch.no_grad():
            return [layer(x, self.cos, self.sin) for x in self.hidden]

    def capture(self, layer: nn.Module, names: Iterable[str], on_input: Callable[[str, torch.Tensor], None],
                stop_early: bool = True) -> None:
        """Run the layer over every batch, calling `on_input(name, x [batch, seqlen, in])` with the
        input each named linear receives; stops each batch once all of them have been called."""
        names = list(names)
        seen: set[str] = set()

        def hook(name):
            def fn(_module, args):
                on_input(name, args[0])
                seen.add(name)
                if stop_early and len(seen) == len(names):
                    raise _StopForward
            return fn

        handles = [layer.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
        try:
            with torch.no_grad():
                for x in self.hidden:
                    seen.clear()
                    try:
                        layer(x, self.cos, self.sin)
                    except _StopForward:
                        pass
        finally:
            for h in handles:
                h.remove()


class LayerMethod(Protocol):
    """One algorithm over one decoder layer: quantizes its linears in place (the dense weight
    becomes the dequantized one; AWQ also rescales norms) and returns the codes by sublayer name."""

    needs_calibration: bool

    def quantize_layer(self, layer: nn.Module, inputs: LayerInputs | None, prefix: str) -> dict[str, QuantizedWeight]:
        ...


def set_weight(linear: nn.Module, qw: QuantizedWeight) -> None:
    linear.weight.data.copy_(qw.dequantize().to(linear.weight.dtype))


def relative_error(out_q: list[torch.Tensor], out_fp: list[torch.Tensor], inp: list[torch.Tensor]) -> float:
    """||out_q - out_fp||^2 / ||out_fp - inp||^2: the error relative to what the layer adds to the
    residual stream (the residual itself would make every layer's error look tiny)."""
    num = sum(float((q - f).float().pow(2).sum()) for q, f in zip(out_q, out_fp))
    den = sum(float((f - x).float().pow(2).sum()) for f, x in zip(out_fp, inp))
    return num / max(den, 1e-30)


def quantize_model_layers(model, method: LayerMethod, calib_ids: torch.Tensor | None, device: torch.device | str,
                          batch_tokens: int = 16384, log: Callable[[str], None] | None = print
                          ) -> tuple[dict[str, QuantizedWeight], list[float]]:
    """Quantize every decoder layer of `model` (kept on its own device, normally the CPU) on
    `device`; returns ({"model.layers.i.self_attn.q_proj": QuantizedWeight, ...}, the relative
    output error of each layer, empty without calibration)."""
    device = torch.device(device)
    layers = model.layers
    n_layers = len(layers)
    dtype = next(model.parameters()).dtype
    qweights: dict[str, QuantizedWeight] = {}
    t0 = time.time()
    inputs = None
    if method.needs_calibration:
        inputs = _first_inputs(model, calib_ids, device, dtype, batch_tokens)
    errors: list[float] = []
    for i, layer in enumerate(layers):
        home = next(layer.parameters()).device
        layer.to(device)
        out_fp = inputs.forward(layer) if inputs is not None else None
        for name, qw in method.quantize_layer(layer, inputs, f"model.layers.{i}").items():
            qweights[f"model.layers.{i}.{name}"] = qw
        msg = f"layer {i + 1}/{n_layers}  elapsed {time.time() - t0:.1f}s"
        if inputs is not None and getattr(method, "keeps_weights", False):
            # a method that only measures (quant/measure.py) leaves the weights as they were: the fp
            # outputs are the next inputs, and there is no quantized output to compare
            inputs = LayerInputs(out_fp, inputs.cos, inputs.sin)
        elif inputs is not None:
            out_q = inputs.forward(layer)
            err = relative_error(out_q, out_fp, inputs.hidden)
            errors.append(err)
            msg += f"  err={err:.3e} (mean {sum(errors) / len(errors):.3e})"
            next_hidden = out_fp if getattr(method, "next_inputs_fp", False) else out_q
            inputs = LayerInputs(next_hidden, inputs.cos, inputs.sin)
            del out_q
        del out_fp
        layer.to(home)
        if log:
            log(msg)
    return qweights, errors


def _first_inputs(model, calib_ids: torch.Tensor, device, dtype, batch_tokens: int) -> LayerInputs:
    n, seqlen = calib_ids.shape
    batch = max(1, batch_tokens // seqlen)
    embed = model.model.embed_tokens
    with torch.no_grad():
        hidden = [embed(calib_ids[s:s + batch].to(embed.weight.device)).to(device) for s in range(0, n, batch)]
        positions = torch.arange(seqlen, device=model.rotary.inv_freq.device)[None]  # [1, seqlen]
        cos, sin = model.rope(positions, dtype)
    return LayerInputs(hidden, cos.to(device), sin.to(device))
