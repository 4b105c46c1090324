"""measurement.json: for every decoder linear, the size and the error of each candidate setting
(bits x group size). Written layer by layer by `lowbit measure` (quant/measure.py), read by the
bit-budget optimizer (quant/bit_budget.py); one measurement serves any --bpw (ExLlamaV2's split of
measurement and optimisation, with a file between them).

Schema (version 1; the README's "Mixed precision" section shows an example):
    format "lowbit-measurement", version 1
    model        {source, architecture, num_layers}: where it was measured (informative)
    method       {algorithm "gptq", act_order, static_groups, symmetric, damp_percent}
    calibration  {dataset, samples, seqlen, seed}
    error        what `err` means (one sentence)
    bpw          how `bpw` / `total_bits` count
    layers_done  decoder layers measured so far (a run resumes after the last one)
    seconds      measuring time so far
    measurement  [{key, shape [out, in], numel, options: [{desc, bpw, total_bits, err, qparams {bits, group_size}}]}],
                 in the model's order (layer by layer, q k v o gate up down)
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.formats import gptq_format
from lowbit.quant.driver import LINEAR_NAMES

FORMAT, VERSION = "lowbit-measurement", 1
CANDIDATE_BITS = (2, 3, 4, 5, 6, 8)
CANDIDATE_GROUPS = (32, 64, 128)
ERROR_MEANING = ("relative output error of the linear on the calibration inputs of the full-precision model, "
                 "||X W^T - X Wq^T||^2 / ||X W^T||^2, W quantized alone by GPTQ")
BPW_MEANING = ("bits + (16 + bits) / group_size: the codes, one fp16 scale and one bits-wide zero per group, as the "
               "GPTQ layout stores them (qweight, scales, qzeros; g_idx not counted)")


def option_total_bits(out_features: int, in_features: int, bits: int, group_size: int) -> int:
    """Bits on disk for one linear at (bits, group_size): codes + per group an fp16 scale and a bits-wide zero."""
    return gptq_format.bits_on_disk(in_features, out_features, bits, group_size)


def candidates(in_features: int, bits: tuple[int, ...] = CANDIDATE_BITS,
               group_sizes: tuple[int, ...] = CANDIDATE_GROUPS) -> list[tuple[int, int]]:
    """(bits, group_size) pairs a linear can take: only group sizes that divide in_features
    (SmolLM2's 576 takes 32 and 64, not 128)."""
    return [(b, g) for b in bits for g in group_sizes if in_features % g == 0]


def option(out_features: int, in_features: int, bits: int, group_size: int, err: float | None) -> dict:
    total = option_total_bits(out_features, in_features, bits, group_size)
    return {"desc": f"{bits}b g{group_size}", "bpw": total / (out_features * in_features), "total_bits": total,
            "err": err, "qparams": {"bits": bits, "group_size": group_size}}


def linear_shapes(net) -> list[tuple[str, int, int]]:
    """(key, out_features, in_features) of every decoder linear, in the driver's order."""
    return [(f"model.layers.{i}.{n}", layer.get_submodule(n).out_features, layer.get_submodule(n).in_features)
            for i, layer in enumerate(net.layers) for n in LINEAR_NAMES]


def new_measurement(net, source: str, method: dict, calibration: dict) -> dict:
    return {"format": FORMAT, "version": VERSION,
            "model": {"source": source, "architecture": net.config.architecture, "num_layers": len(net.layers)},
            "method": method, "calibration": calibration, "error": ERROR_MEANING, "bpw": BPW_MEANING,
            "layers_done": 0, "seconds": 0.0, "measurement": []}


def write_measurement(path: str | Path, data: dict) -> None:
    """Write to a temp file beside `path` and rename: an interrupted write leaves the last complete file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_measurement(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"{path}: no such measurement file; make one with `lowbit measure MODEL --out {path}`")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LowbitError(f"{path}: not a JSON measurement file ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise LowbitError(f"{path}: not a lowbit measurement (expected \"format\": \"{FORMAT}\")")
    if data.get("version") != VERSION:
        raise LowbitError(f"{path}: measurement version {data.get('version')!r}; this lowbit reads version {VERSION}")
    for entry in data.get("measurement", []):
        for opt in entry.get("options", []):
            if not isinstance(opt.get("err"), (int, float)) or not math.isfinite(opt["err"]):
                raise LowbitError(f"{path}: {entry.get('key')} option {opt.get('desc')}: err {opt.get('err')!r} "
                                  f"is not a finite number")
    return data


def is_complete(data: dict) -> bool:
    """Every layer measured, and every linear's sensitivity (quant/sensitivity.py) after them."""
    return data["layers_done"] == data["model"]["num_layers"] and "sensitivity" in data


def sensitivity_weights(data: dict) -> list[float]:
    """Per measured linear, in order: what one unit of its relative output error costs (KL, nats a token)."""
    per = data["sensitivity"]["per_linear"]
    return [per[e["key"]] for e in data["measurement"]]


def check_same_model(data: dict, shapes: list[tuple[str, int, int]], where: str) -> None:
    """Refuse a measurement of another model: the first linear whose name or shape differs, or a count
    that differs, is named. A partial measurement is compared as far as it goes."""
    entries = data["measurement"]
    if data["model"]["num_layers"] * len(LINEAR_NAMES) != len(shapes):
        raise LowbitError(f"{where}: measured a model of {data['model']['num_layers']} layers "
                          f"({data['model'].get('source')}), this one has {len(shapes) // len(LINEAR_NAMES)}; "
                          f"measure this model instead")
    for entry, (key, out_f, in_f) in zip(entries, shapes):
        if entry["key"] != key or list(entry["shape"]) != [out_f, in_f]:
            raise LowbitError(f"{where}: {entry['key']} {list(entry['shape'])} was measured where this model has "
                              f"{key} [{out_f}, {in_f}]: a measurement of another model "
                              f"({data['model'].get('source')}); measure this model instead")
