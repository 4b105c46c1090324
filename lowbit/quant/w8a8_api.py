"""`lowbit.quantize(MODEL, "smoothquant" | "w8a8" | "fp8", work_dir)`: 8-bit weights and activations,
written as a compressed-tensors checkpoint. Every option is checked before the model is loaded.

  smoothquant  SmoothQuant's smoothing (alpha given or `auto`), then int8 per channel; calibrated
  w8a8         int8 per channel, no smoothing: the baseline smoothing is measured against
  fp8          fp8 e4m3 per channel; activations fp8 per token; no calibration
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from lowbit.errors import LowbitError
from lowbit.formats.compressed_tensors import W8A8Scheme
from lowbit.quant.calibration import DEFAULT_DATASET, DEFAULT_SAMPLES, DEFAULT_SEQLEN

W8A8_METHODS = ("smoothquant", "w8a8", "fp8")
ACT_SCHEMES = ("dynamic", "static")


def parse_alpha(alpha: float | str | None) -> float | None:
    """0.5, "0.5" -> 0.5; "auto" / None -> None (searched per layer)."""
    if alpha is None or (isinstance(alpha, str) and alpha.strip().lower() == "auto"):
        return None
    try:
        value = float(alpha)
    except ValueError:
        raise LowbitError(f"--alpha {alpha!r}: expected a number in [0, 1] or 'auto'") from None
    if not 0.0 <= value <= 1.0:
        raise LowbitError(f"--alpha {alpha}: expected a number in [0, 1] or 'auto'")
    return value


def check_w8a8_options(method: str, alpha, act_scheme: str) -> tuple[W8A8Scheme, float | None]:
    if method not in W8A8_METHODS:
        raise LowbitError(f"method {method!r}: expected one of {', '.join(W8A8_METHODS)}")
    if act_scheme not in ACT_SCHEMES:
        raise LowbitError(f"--act-scheme {act_scheme!r}: expected dynamic (per token) or static (per tensor)")
    if method != "smoothquant" and alpha not in (None, 0.5, "0.5"):
        raise LowbitError(f"--alpha is a SmoothQuant option; {method} does not smooth")
    weight_type = "float" if method == "fp8" else "int"
    return W8A8Scheme(weight_type, "channel", act_scheme == "dynamic"), parse_alpha(alpha)


def quantize_w8a8(model="default", method: str = "smoothquant", work_dir: str | Path | None = None, *,
                  alpha: float | str | None = 0.5, act_scheme: str = "dynamic",
                  calib_dataset: str = DEFAULT_DATASET, calib_samples: int = DEFAULT_SAMPLES,
                  calib_seqlen: int = DEFAULT_SEQLEN, seed: int = 0, device: str | None = None,
                  dtype: str = "fp32", overwrite: bool = False, tokenizer=None,
                  log: Callable[[str], None] | None = print, **ignored):
    """Quantize MODEL's decoder linears to W8A8 int8 (smoothquant, w8a8) or FP8 and, with work_dir,
    write a compressed-tensors checkpoint there. Returns a QuantizeResult whose model computes what
    the checkpoint computes (weights dequantized, inputs rounded by forward pre-hooks)."""
    from lowbit.quant.api import QuantizeResult, check_work_dir, model_to_quantize, run_layers

    weight_only = {k: v for k, v in ignored.items() if k in ("act_order", "fmt", "awq_clip") and v}
    if weight_only:
        raise LowbitError(f"{method}: {', '.join(weight_only)} apply to weight-only methods (rtn, awq, gptq)")
    scheme, alpha_value = check_w8a8_options(method, alpha, act_scheme)
    if work_dir is not None:
        check_work_dir(work_dir, overwrite)
    net, tokenizer = model_to_quantize(model, tokenizer, dtype)
    if method == "smoothquant":
        from lowbit.quant.smoothquant import SMOOTHABLE, SmoothQuantMethod

        if net.config.architecture not in SMOOTHABLE:
            raise LowbitError(f"{net.config.architecture}: no SmoothQuant smoothing map for this architecture; "
                              f"supported: {', '.join(SMOOTHABLE)}")
        layer_method = SmoothQuantMethod(scheme, alpha_value, log=log)
    else:
        from lowbit.quant.w8a8 import W8A8Method

        layer_method = W8A8Method(scheme)
    qweights, errors, seconds, calib = run_layers(net, layer_method, tokenizer, calib_dataset, calib_samples,
                                                  calib_seqlen, seed, device, log)
    options = {"method": method, "scheme": scheme.describe(), "act_scheme": act_scheme,
               "alpha": (alpha_value if alpha_value is not None else "auto") if method == "smoothquant" else None,
               "calib_dataset": calib_dataset if calib is not None else None,
               "calib_samples": calib_samples if calib is not None else None,
               "calib_seqlen": calib_seqlen if calib is not None else None,
               "seed": seed if calib is not None else None}
    result = QuantizeResult(net, qweights, errors, seconds, None, options)
    if method == "smoothquant":
        result.options["alphas"] = layer_method.alphas
    if work_dir is not None:
        from lowbit.quant.ct_export import save_w8a8

        lowbit_options = {k: v for k, v in options.items() if k != "alphas"}
        result.out_dir = save_w8a8(work_dir, net, qweights, scheme, tokenizer, overwrite=overwrite,
                                   extra_config={"lowbit": lowbit_options})
    return result
