"""`lowbit.quantize(...)`: check every option, load, calibrate, run the method layer by layer, save.

Everything that can be refused is refused before the first layer is touched: the method and
format, the bit width, a group size that does not divide some layer's input dimension, a model
that is already quantized, an output directory in the way, a calibration set that is too short.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from lowbit.atomic_dir import check_output_dir
from lowbit.errors import LowbitError
from lowbit.quant.calibration import DEFAULT_DATASET, DEFAULT_SAMPLES, DEFAULT_SEQLEN, calibration_set
from lowbit.quant.driver import LINEAR_NAMES, quantize_model_layers
from lowbit.quant.qweight import QuantizedWeight
from lowbit.quant.rtn import check_bits, check_group_size

METHODS = ("rtn", "awq", "gptq", "awq-gptq")
DEFAULT_FORMAT = {"rtn": "awq", "awq": "awq", "gptq": "gptq", "awq-gptq": "gptq"}
NEXT_INPUTS = ("quantized", "fp")  # what the next layer is calibrated on (driver.py)
GPTQ_METHODS = ("gptq", "awq-gptq")  # the methods that round with GPTQ (and so take --act-order)
DEFAULT_ACT_ORDER = True  # measured on the default model, see README "Weight quantization"
# bit widths each on-disk layout holds: AutoAWQ's GEMM layout packs 4-bit codes only; the GPTQ
# layout (AutoGPTQ / GPTQModel) packs 2, 3, 4 and 8.
# 5/6-bit codes pack into the same bit stream but only lowbit reads them, so they are kept to the
# per-linear choices of `quantize mixed` (quant/mixed.py)
STANDARD_BITS = (2, 3, 4, 8)
FORMAT_BITS = {"awq": (4,), "gptq": STANDARD_BITS}
DEFAULT_GROUP_SIZE = 128  # AWQ / LMDeploy default; refused with the valid sizes where it does not divide


@dataclass
class QuantizeResult:
    model: torch.nn.Module  # dense model whose linear weights are the dequantized ones (and AWQ's folded norms)
    qweights: dict[str, QuantizedWeight]
    layer_errors: list[float]  # relative output error per layer (empty for RTN)
    seconds: float  # calibration + quantization, not loading or saving
    out_dir: Path | None = None
    options: dict = field(default_factory=dict)


def check_options(method: str, w_bits: int, fmt: str, act_order: bool, static_groups: bool) -> None:
    if method not in METHODS:
        raise LowbitError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    check_bits(w_bits, allowed=STANDARD_BITS)
    if fmt not in FORMAT_BITS:
        raise LowbitError(f"--format {fmt!r}: expected awq or gptq")
    if w_bits not in FORMAT_BITS[fmt]:
        raise LowbitError(f"--format {fmt} stores {', '.join(map(str, FORMAT_BITS[fmt]))}-bit codes, not "
                          f"--w-bits {w_bits}; use --format gptq for {w_bits}-bit {method}")
    if act_order and method not in GPTQ_METHODS:
        raise LowbitError(f"--act-order is a GPTQ option; {method} does not use it")
    if act_order and not static_groups and fmt == "awq":
        raise LowbitError("--act-order without static groups needs g_idx, which the awq format cannot store; "
                          "use --format gptq or keep --static-groups")


def linear_in_features(model) -> dict[str, int]:
    return {f"model.layers.{i}.{n}": layer.get_submodule(n).in_features
            for i, layer in enumerate(model.layers) for n in LINEAR_NAMES}


def make_method(method: str, w_bits: int, group_size: int, symmetric: bool, act_order: bool, static_groups: bool,
                awq_clip: bool = True, mse: bool = False, next_inputs_fp: bool = False):
    if method == "rtn":
        from lowbit.quant.rtn import RTNMethod

        return RTNMethod(w_bits, group_size, symmetric, mse=mse)
    if method == "awq":
        from lowbit.quant.awq import AWQMethod

        return AWQMethod(w_bits, group_size, symmetric, clip=awq_clip, next_inputs_fp=next_inputs_fp)
    if method == "awq-gptq":
        from lowbit.quant.awq_gptq import AWQGPTQMethod

        return AWQGPTQMethod(w_bits, group_size, symmetric, act_order=act_order, static_groups=static_groups, mse=mse,
                             next_inputs_fp=next_inputs_fp)
    from lowbit.quant.gptq import GPTQMethod

    return GPTQMethod(w_bits, group_size, symmetric, act_order=act_order, static_groups=static_groups, mse=mse,
                      next_inputs_fp=next_inputs_fp)


def check_work_dir(work_dir: str | Path, overwrite: bool) -> None:
    """Refuse a --work-dir that holds something, before any work, unless --overwrite."""
    check_output_dir(work_dir, overwrite, what="--work-dir")


def model_to_quantize(model: str | Path | torch.nn.Module, tokenizer, dtype: str):
    """(net, tokenizer) of a full-precision, unmerged model: loaded from a path or name (on the CPU;
    the driver moves layers to the device one by one), or an already loaded one with its tokenizer.
    Refuses merged projections and anything already quantized."""
    from lowbit.loading.loader import build_model, open_checkpoint, parse_dtype
    from lowbit.models.default import resolve_model

    if isinstance(model, torch.nn.Module):
        # an already loaded dense model (quantized in place); its tokenizer must come with it
        if tokenizer is None:
            raise LowbitError("quantize(model=<loaded model>) needs tokenizer=")
        net = model
        merged = [n for n, m in net.named_modules() if getattr(m, "shards", None)]
        if merged:
            raise LowbitError(f"{merged[0]}: q/k/v (gate/up) are merged for inference; quantizers work on each "
                              f"projection: load the model with build_model(..., fused=False)")
    else:
        ckpt = open_checkpoint(resolve_model(str(model)))
        if ckpt.quant:
            raise LowbitError(f"{ckpt.source}: already quantized (quantization_config.quant_method "
                              f"{ckpt.quant.get('quant_method')!r}); quantize the original full-precision model")
        net = build_model(ckpt, parse_dtype(dtype), "cpu", fused=False)
        tokenizer = ckpt.tokenizer()
    already = [n for n, m in net.named_modules() if getattr(m, "method", None) is not None and m.method.name != "dense"]
    if already:
        raise LowbitError(f"{already[0]}: already quantized ({net.get_submodule(already[0]).method.name}); "
                          f"quantize the original full-precision model")
    return net, tokenizer


def run_layers(net, layer_method, tokenizer, calib_dataset: str, calib_samples: int, calib_seqlen: int,
               seed: int, device: str | None, log):
    """Draw the calibration windows if the method needs them and quantize layer by layer on
    `device` (default: the GPU if present). -> (qweights, per-layer errors, seconds, calibration ids)."""
    from lowbit.loading.loader import default_device

    calib = None
    if layer_method.needs_calibration:
        calib = calibration_set(tokenizer, calib_dataset, calib_samples, calib_seqlen, seed)
    dev = torch.device(device) if device else default_device()
    t0 = time.time()
    qweights, errors = quantize_model_layers(net, layer_method, calib, dev, log=log)
    return qweights, errors, time.time() - t0, calib


def quantize(model: str | Path | torch.nn.Module = "default", method: str = "awq", work_dir: str | Path | None = None, *,
             w_bits: int = 4, group_size: int = DEFAULT_GROUP_SIZE, zero_point: bool = True,
             calib_dataset: str = DEFAULT_DATASET, calib_samples: int = DEFAULT_SAMPLES,
             calib_seqlen: int = DEFAULT_SEQLEN, seed: int = 0, device: str | None = None,
             act_order: bool | None = None, static_groups: bool = True, fmt: str | None = None, mse: bool = False,
             dtype: str = "fp32", overwrite: bool = False, awq_clip: bool = True, tokenizer=None,
             log: Callable[[str], None] | None = print, bpw: float | None = None,
             measurement: str | Path | None = None, next_inputs: str = "quantized", max_bytes: str | int | None = None,
             kv_tokens: int = 0, kv_bits: int = 16, **w8a8_options) -> QuantizeResult:
    """Quantize MODEL's decoder linears with rtn | awq | gptq | awq-gptq and, with `work_dir`, write an
    AWQ- or GPTQ-format checkpoint there. Returns the fake-quantized model and the codes of every linear.
    act_order None: on for the GPTQ methods (DEFAULT_ACT_ORDER). mse: RTN and GPTQ search each
    group's range (rtn.group_scale_zero; off by default until a perplexity comparison decides);
    AWQ has its own activation-aware clip search instead. "mixed" picks bits and group size per
    linear for `bpw` (or for `max_bytes`, with `kv_tokens` of `kv_bits` KV set aside) from a
    measurement (quant/mixed.py). next_inputs: what each next layer is
    calibrated on, this layer's "quantized" outputs (GPTQ's true-sequential mode, the default) or its
    "fp" (full-precision) outputs, as llm-awq and AutoAWQ do."""
    if next_inputs not in NEXT_INPUTS:
        raise LowbitError(f"--next-inputs {next_inputs!r}: expected one of {', '.join(NEXT_INPUTS)}")
    if next_inputs != "quantized" and method not in ("awq", "gptq", "awq-gptq"):
        raise LowbitError(f"--next-inputs applies to awq, gptq and awq-gptq, which calibrate layer by layer; "
                          f"not {method}")
    if method == "mixed":
        from lowbit.quant.mixed import quantize_mixed

        if w8a8_options:
            raise LowbitError(f"mixed: {', '.join(w8a8_options)} apply to smoothquant / w8a8 / fp8 only")
        return quantize_mixed(model, work_dir, bpw=bpw, measurement=measurement, calib_dataset=calib_dataset,
                              calib_samples=calib_samples, calib_seqlen=calib_seqlen, seed=seed, device=device,
                              dtype=dtype, overwrite=overwrite, tokenizer=tokenizer, log=log, max_bytes=max_bytes,
                              kv_tokens=kv_tokens, kv_bits=kv_bits)
    if bpw is not None or measurement is not None or max_bytes is not None or kv_tokens or kv_bits != 16:
        raise LowbitError(f"{method}: --bpw, --max-bytes (--kv-tokens, --kv-bits) and --measurement are options of "
                          f"`quantize mixed`")
    if method in ("smoothquant", "w8a8", "fp8"):  # 8-bit weights and activations: quant/w8a8_api.py
        from lowbit.quant.w8a8_api import quantize_w8a8

        return quantize_w8a8(model, method, work_dir, calib_dataset=calib_dataset, calib_samples=calib_samples,
                             calib_seqlen=calib_seqlen, seed=seed, device=device, dtype=dtype, overwrite=overwrite,
                             tokenizer=tokenizer, log=log, act_order=act_order, fmt=fmt, **w8a8_options)
    if w8a8_options:
        raise LowbitError(f"{method}: {', '.join(w8a8_options)} apply to smoothquant / w8a8 / fp8 only")
    fmt = fmt or DEFAULT_FORMAT.get(method, "awq")
    if act_order is None:
        act_order = DEFAULT_ACT_ORDER and method in GPTQ_METHODS
    check_options(method, w_bits, fmt, act_order, static_groups)
    if work_dir is not None:
        import importlib.util

        if importlib.util.find_spec("lowbit.quant.export") is None:
            raise LowbitError("writing a quantized checkpoint needs lowbit.quant.export, which this install lacks; "
                              "call without work_dir to quantize in memory")
        check_work_dir(work_dir, overwrite)
    net, tokenizer = model_to_quantize(model, tokenizer, dtype)
    check_group_size(linear_in_features(net), group_size)
    layer_method = make_method(method, w_bits, group_size, not zero_point, act_order, static_groups, awq_clip, mse,
                               next_inputs_fp=next_inputs == "fp")
    qweights, errors, seconds, calib = run_layers(net, layer_method, tokenizer, calib_dataset, calib_samples,
                                                  calib_seqlen, seed, device, log)
    options = {"method": method, "w_bits": w_bits, "group_size": group_size, "zero_point": zero_point,
               "act_order": act_order, "static_groups": static_groups if act_order else None,
               "mse_range": mse if method != "awq" else None,
               "calib_dataset": calib_dataset if calib is not None else None,
               "calib_samples": calib_samples if calib is not None else None,
               "calib_seqlen": calib_seqlen if calib is not None else None, "seed": seed,
               "next_inputs": next_inputs if calib is not None else None}
    result = QuantizeResult(net, qweights, errors, seconds, None, options)
    if work_dir is not None:
        from lowbit.quant.export import save_quantized

        result.out_dir = save_quantized(work_dir, net, qweights, fmt, tokenizer, overwrite=overwrite,
                                        extra_config={"lowbit": options})
    return result
