"""The measurement pass of mixed precision: for every decoder linear, GPTQ at every candidate
(bits x group size) and the output error each leaves, on the calibration inputs.

It runs on the shared true-sequential driver but keeps the full-precision weights: every linear is
measured on the activations of the full-precision model, so the measurement depends on no budget
and serves any --bpw (the optimizer treats the errors as adding up independently). The error comes
from the layer's Hessian H = 2 X^T X / n that GPTQ accumulates anyway:
||X (W - Wq)^T||^2 / ||X W^T||^2 = tr(D H D^T) / tr(W H W^T), D = W - Wq, without keeping X.
After each decoder layer the file is rewritten atomically, so an interrupted run resumes after the
last finished layer (only the cheap full-precision forward of the finished layers is redone). Then
every linear's sensitivity (quant/sensitivity.py: what a unit of its output error costs the model's
next-token distributions) is measured once and written too; a file without it resumes there.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.quant.driver import LINEAR_NAMES, LayerInputs, quantize_model_layers
from lowbit.quant.gptq import HessianAccumulator, gptq_quantize
from lowbit.quant.measurement import (CANDIDATE_BITS, CANDIDATE_GROUPS, candidates, check_same_model, is_complete,
                                      linear_shapes, new_measurement, option, read_measurement, write_measurement)
from lowbit.quant.rtn import check_bits
from lowbit.quant.sensitivity import REL_NOISE, linear_sensitivities, sensitivity_windows

SENSITIVITY_MEANING = ("per linear: the mean KL divergence (nats a token) of the model's next-token distributions when "
                       "Gaussian noise of relative power relative_noise is added to that linear's output alone, divided "
                       "by relative_noise; the optimizer minimises sum(sensitivity * err)")

PACK_MULTIPLE = 32  # the GPTQ layout packs 32 codes per `bits` words along in, and zeros along out


def output_error(weight: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """||X (W - Wq)^T||^2 / ||X W^T||^2 from H ∝ X^T X (the scale of H cancels)."""
    w, h = weight.float(), hessian.float()
    d = w - w_hat.float()
    num = float(((d @ h) * d).sum())
    den = float(((w @ h) * w).sum())
    return num / max(den, 1e-30)


def measure_linear(weight: torch.Tensor, hessian: torch.Tensor, key: str, settings: list[tuple[int, int]],
                   gptq: dict) -> dict:
    """One measurement entry: GPTQ at each (bits, group_size), its size and output error."""
    out_f, in_f = weight.shape
    options = []
    for bits, gs in settings:
        qw = gptq_quantize(weight, hessian, bits, gs, name=key, **gptq)
        options.append(option(out_f, in_f, bits, gs, output_error(weight, qw.dequantize().to(weight.device), hessian)))
    return {"key": key, "shape": [out_f, in_f], "numel": out_f * in_f, "options": options}


@dataclass
class MeasureMethod:
    """The driver's per-layer hook: measures the linears of layers not yet in the file, returns no
    codes and leaves the weights alone (`keeps_weights`)."""

    layers_done: int
    bits: tuple[int, ...]
    group_sizes: tuple[int, ...]
    gptq: dict
    on_layer: Callable[[int, list[dict]], None]
    needs_calibration: bool = True
    keeps_weights: bool = True
    skipped: list[int] = field(default_factory=list)

    def quantize_layer(self, layer: nn.Module, inputs: LayerInputs, prefix: str) -> dict:
        index = int(prefix.rsplit(".", 1)[1])
        if index < self.layers_done:  # measured by an earlier run
            self.skipped.append(index)
            return {}
        dev = inputs.hidden[0].device
        # full-precision weights throughout, so every linear's input is there after one pass
        acc = {n: HessianAccumulator(layer.get_submodule(n).in_features, dev) for n in LINEAR_NAMES}
        inputs.capture(layer, LINEAR_NAMES, lambda n, x: acc[n].add(x))
        entries = []
        for n in LINEAR_NAMES:
            w = layer.get_submodule(n).weight.data
            entries.append(measure_linear(w, acc[n].h_in_in, f"{prefix}.{n}",
                                          candidates(w.shape[1], self.bits, self.group_sizes), self.gptq))
        self.on_layer(index, entries)
        return {}


def check_candidates(shapes: list[tuple[str, int, int]], bits: tuple[int, ...], group_sizes: tuple[int, ...]) -> None:
    for b in bits:
        check_bits(b, "measure: bits")
    for key, out_f, in_f in shapes:
        for what, n in (("in_features", in_f), ("out_features", out_f)):
            if n % PACK_MULTIPLE:
                raise LowbitError(f"{key}: {what} {n} is not a multiple of {PACK_MULTIPLE}, which the gptq layout "
                                  f"needs; mixed precision cannot store this model")
        if not candidates(in_f, bits, group_sizes):
            raise LowbitError(f"{key}: none of the group sizes {', '.join(map(str, group_sizes))} divides "
                              f"in_features {in_f}")


def measure_model(net, calib_ids: torch.Tensor, out: str | Path, device, *, source: str, calibration: dict,
                  bits: tuple[int, ...] = CANDIDATE_BITS, group_sizes: tuple[int, ...] = CANDIDATE_GROUPS,
                  act_order: bool = True, static_groups: bool = True, symmetric: bool = False,
                  damp_percent: float = 0.01, log: Callable[[str], None] | None = print) -> dict:
    """Measure `net` (a dense, unmerged model) on `calib_ids` into the file `out`, resuming the file if
    it holds an unfinished measurement of the same model with the same options. Returns the data."""
    out = Path(out)
    shapes = linear_shapes(net)
    check_candidates(shapes, bits, group_sizes)
    gptq = {"act_order": act_order, "static_groups": static_groups, "symmetric": symmetric, "damp_percent": damp_percent}
    method_meta = {"algorithm": "gptq", **gptq, "bits": list(bits), "group_sizes": list(group_sizes)}
    if out.exists():
        data = read_measurement(out)
        check_same_model(data, shapes, str(out))
        for what, now in (("method", method_meta), ("calibration", calibration)):
            if data[what] != now:
                raise LowbitError(f"{out}: an earlier measurement with {what} {data[what]}, not {now}; pass the same "
                                  f"options to resume it, or choose another --out")
        if is_complete(data):
            if log:
                log(f"{out}: already complete ({data['layers_done']} layers); nothing to measure")
            return data
        if log:
            log(f"{out}: resuming after layer {data['layers_done']} of {data['model']['num_layers']}"
                + ("" if data["layers_done"] < data["model"]["num_layers"] else ", at the sensitivities"))
    else:
        data = new_measurement(net, source, method_meta, calibration)
    t_last = time.time()

    def on_layer(index: int, entries: list[dict]) -> None:
        nonlocal t_last
        data["measurement"].extend(entries)
        data["layers_done"] = index + 1
        data["seconds"] = round(data["seconds"] + time.time() - t_last, 2)
        t_last = time.time()
        write_measurement(out, data)

    if data["layers_done"] < data["model"]["num_layers"]:
        method = MeasureMethod(data["layers_done"], bits, group_sizes, gptq, on_layer)
        quantize_model_layers(net, method, calib_ids, device, log=log)
    t0 = time.time()
    per_linear = linear_sensitivities(net, calib_ids, [key for key, _, _ in shapes], device, log=log)
    data["sensitivity"] = {"meaning": SENSITIVITY_MEANING, "relative_noise": REL_NOISE,
                           "tokens": sensitivity_windows(calib_ids).numel(),
                           "seconds": round(time.time() - t0, 2), "per_linear": per_linear}
    write_measurement(out, data)
    return data


def measure(model="default", out: str | Path = "measurement.json", *, calib_dataset: str | None = None,
            calib_samples: int | None = None, calib_seqlen: int | None = None, seed: int = 0, device: str | None = None,
            dtype: str = "fp32", tokenizer=None, bits: tuple[int, ...] = CANDIDATE_BITS,
            group_sizes: tuple[int, ...] = CANDIDATE_GROUPS, log: Callable[[str], None] | None = print) -> dict:
    """`lowbit measure`: load MODEL (a path, a name, or a loaded unmerged model with its tokenizer),
    draw the calibration windows and measure into `out`."""
    from lowbit.loading.loader import default_device
    from lowbit.quant.api import model_to_quantize
    from lowbit.quant.calibration import DEFAULT_DATASET, DEFAULT_SAMPLES, DEFAULT_SEQLEN, calibration_set

    calibration = {"dataset": calib_dataset or DEFAULT_DATASET, "samples": calib_samples or DEFAULT_SAMPLES,
                   "seqlen": calib_seqlen or DEFAULT_SEQLEN, "seed": seed}
    source = "<in memory>" if isinstance(model, nn.Module) else str(model)
    net, tokenizer = model_to_quantize(model, tokenizer, dtype)
    calib = calibration_set(tokenizer, calibration["dataset"], calibration["samples"], calibration["seqlen"], seed)
    dev = torch.device(device) if device else default_device()
    return measure_model(net, calib, out, dev, source=source, calibration=calibration, bits=bits,
                         group_sizes=group_sizes, log=log)
