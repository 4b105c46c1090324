"""`lowbit quantize mixed`: measure (or reuse a measurement), pick one (bits, group size) per linear
for a target bits per weight (quant/bit_budget.py), quantize each linear with its choice by GPTQ,
and write a GPTQ checkpoint whose per-linear settings are GPTQModel `dynamic` overrides
(quant/export.py). ExLlamaV2's EXL2 recipe without its two-width mixes within one matrix.
"""
from __future__ import annotations

import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.quant.bit_budget import Choice, check_budget, optimize
from lowbit.quant.byte_budget import bpw_for_bytes, parse_size
from lowbit.quant.gptq import GPTQMethod
from lowbit.quant.measure import check_candidates, measure_model, output_error
from lowbit.quant.measurement import (candidates, check_same_model, is_complete, linear_shapes, option,
                                      read_measurement, sensitivity_weights)
from lowbit.quant.qweight import QuantizedWeight

# the GPTQ options every mixed run uses, in measurement and quantization alike, so that the measured
# error is the error of what gets written (act-order with static groups: quant/api.py's default)
GPTQ_OPTIONS = dict(act_order=True, static_groups=True, symmetric=False)


@dataclass
class MixedGPTQMethod(GPTQMethod):
    """GPTQ with each linear's own (bits, group_size); records each linear's output error."""

    settings: dict[str, tuple[int, int]] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)

    def setting(self, key: str) -> tuple[int, int]:
        return self.settings[key]

    def quantized(self, key: str, weight: torch.Tensor, qw: QuantizedWeight, hessian: torch.Tensor) -> None:
        self.errors[key] = output_error(weight, qw.dequantize().to(weight.device), hessian)


def shape_only_entries(shapes: list[tuple[str, int, int]]) -> list[dict]:
    """Measurement entries without errors: enough to check a budget before measuring."""
    return [{"key": key, "numel": o * i, "options": [option(o, i, b, g, None) for b, g in candidates(i)]}
            for key, o, i in shapes]


def choice_summary(entries: list[dict], choice: Choice) -> str:
    """'4b g64 x120, 3b g32 x40, ...': how many linears got each option, most common first."""
    counts = Counter(e["options"][p]["desc"] for e, p in zip(entries, choice.picks))
    return ", ".join(f"{desc} x{n}" for desc, n in counts.most_common())


def _measurement_file(work_dir: Path | None) -> tuple[Path, bool]:
    """Where a measurement made by `quantize mixed` lives until the checkpoint is written: a hidden
    sibling of --work-dir (so rerunning the same command resumes it), or a temp file without one.
    -> (path, whether it is a throwaway temp file)."""
    if work_dir is None:
        return Path(tempfile.mkdtemp(prefix="lowbit-measure-")) / "measurement.json", True
    return work_dir.parent / f".{work_dir.name}.measurement.json", False


def quantize_mixed(model="default", work_dir: str | Path | None = None, *, bpw: float | None = None,
                   measurement: str | Path | None = None, calib_dataset: str = "wikitext2", calib_samples: int = 128,
                   calib_seqlen: int = 2048, seed: int = 0, device: str | None = None, dtype: str = "fp32",
                   overwrite: bool = False, tokenizer=None, log: Callable[[str], None] | None = print,
                   max_bytes: str | int | None = None, kv_tokens: int = 0, kv_bits: int = 16):
    """Quantize MODEL's decoder linears to `bpw` bits per weight on average (scales and zeros counted),
    each with its own (bits, group size), and write a GPTQ checkpoint to `work_dir` if given.
    `measurement`: a complete measurement.json of this model to reuse; without it the model is
    measured first (into a hidden sibling of work_dir, which a rerun resumes). Everything that can be
    refused (the budget, the file, the work dir) is refused before the model is measured.
    max_bytes (instead of bpw): the weights' bytes as the engine holds them, after `kv_tokens` tokens of
    `kv_bits` KV cache are set aside; the linears get the bits per weight that leaves (byte_budget.py)."""
    from lowbit.loading.loader import default_device
    from lowbit.quant.api import QuantizeResult, check_work_dir, model_to_quantize
    from lowbit.quant.calibration import calibration_set
    from lowbit.quant.driver import quantize_model_layers

    if (bpw is None) == (max_bytes is None):
        raise LowbitError("quantize mixed needs one budget: --bpw (average bits per weight of the linears, e.g. 4.0) "
                          "or --max-bytes (e.g. 12GB, with --kv-tokens / --kv-bits for the KV cache to fit beside)")
    if max_bytes is None and (kv_tokens or kv_bits != 16):
        raise LowbitError("--kv-tokens / --kv-bits set KV cache aside from --max-bytes; with --bpw there is nothing "
                          "to take it from")
    if max_bytes is not None:
        max_bytes = parse_size(max_bytes)
    work_dir = Path(work_dir) if work_dir is not None else None
    if work_dir is not None:
        check_work_dir(work_dir, overwrite)
    data = None
    if measurement is not None:  # refuse a bad file or budget before loading anything
        data = read_measurement(measurement)
        if not is_complete(data):
            raise LowbitError(f"{measurement}: measures {data['layers_done']} of {data['model']['num_layers']} layers"
                              f"{'' if 'sensitivity' in data else ' and no sensitivities'}; finish it with `lowbit "
                              f"measure` (it resumes) before quantizing with it")
        if bpw is not None:
            check_budget(bpw, data["measurement"])
    source = "<in memory>" if isinstance(model, nn.Module) else str(model)
    net, tokenizer = model_to_quantize(model, tokenizer, dtype)
    shapes = linear_shapes(net)
    check_candidates(shapes, (4,), (32, 64, 128))
    if data is not None:
        check_same_model(data, shapes, str(measurement))
    budget, where = None, "--bpw"
    if max_bytes is not None:
        bpw, budget = bpw_for_bytes(net, sum(o * i for _k, o, i in shapes), max_bytes, kv_tokens, kv_bits)
        where = (f"--max-bytes {max_bytes} (dense parameters {budget['dense_bytes']} B, KV {budget['kv_bytes']} B) "
                 f"leaves")
        check_budget(bpw, data["measurement"] if data is not None else shape_only_entries(shapes), where)
    elif data is None:
        check_budget(bpw, shape_only_entries(shapes))
    calibration = {"dataset": calib_dataset, "samples": calib_samples, "seqlen": calib_seqlen, "seed": seed}
    calib = calibration_set(tokenizer, calib_dataset, calib_samples, calib_seqlen, seed)
    dev = torch.device(device) if device else default_device()
    t0 = time.time()
    meas_path, throwaway = (Path(measurement), False) if data is not None else _measurement_file(work_dir)
    if data is None:
        if log:
            log(f"measuring every linear into {meas_path}")
        data = measure_model(net, calib, meas_path, dev, source=source, calibration=calibration, log=log,
                             **GPTQ_OPTIONS)
    entries = data["measurement"]
    weights = sensitivity_weights(data)
    choice = optimize(entries, bpw, weights)
    settings = {e["key"]: (e["options"][p]["qparams"]["bits"], e["options"][p]["qparams"]["group_size"])
                for e, p in zip(entries, choice.picks)}
    if log:
        log(f"chose {choice.bpw:.4f} bpw for {where} {bpw:g} (predicted KL {choice.weighted_err:.4e} nats a token): "
            f"{choice_summary(entries, choice)}")
    method = MixedGPTQMethod(settings=settings, **GPTQ_OPTIONS)
    qweights, layer_errors = quantize_model_layers(net, method, calib, dev, log=log)
    weight = {e["key"]: w for e, w in zip(entries, weights)}
    measured = sum(weight[k] * err for k, err in method.errors.items())
    if log:
        log(f"predicted KL: {choice.weighted_err:.4e} from the measurement (each linear alone, full-precision inputs), "
            f"{measured:.4e} from the errors as quantized (true-sequential, quantized inputs)")
    options = {"method": "mixed", "bpw_target": bpw, "bpw": round(choice.bpw, 4), **({"byte_budget": budget} if budget else {}),
               "predicted_kl": float(f"{choice.weighted_err:.4e}"), "predicted_kl_as_quantized": float(f"{measured:.4e}"),
               **GPTQ_OPTIONS,
               "calib_dataset": calib_dataset, "calib_samples": calib_samples, "calib_seqlen": calib_seqlen, "seed": seed}
    result = QuantizeResult(net, qweights, layer_errors, time.time() - t0, None,
                            {**options, "settings": settings, "linear_errors": method.errors})
    if work_dir is not None:
        from lowbit.quant.export import save_quantized

        # the measurement travels with the checkpoint, so `--measurement OUT/measurement.json` reuses it
        result.out_dir = save_quantized(work_dir, net, qweights, "gptq", tokenizer, overwrite=overwrite,
                                        extra_config={"lowbit": options}, extra_json={"measurement.json": data})
    if measurement is None:  # made here: now inside the checkpoint (or not wanted, without a work_dir)
        meas_path.unlink(missing_ok=True)
        if throwaway:
            meas_path.parent.rmdir()
    return result
