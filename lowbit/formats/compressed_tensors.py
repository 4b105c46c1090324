"""compressed-tensors' 8-bit schemes (W8A8 int8, FP8) as config.json describes them: building the
`quantization_config` we write and reading the ones others write, refusing what we do not run.

The layout, as compressed-tensors and vLLM define it:
  - compressed_tensors/quantization/quant_scheme.py: the presets INT8_W8A8 (weights int8, channel,
    symmetric, static; input_activations int8, token, symmetric, dynamic) and FP8_DYNAMIC (the
    same with type float); FP8 (tensor/tensor, static) beside them;
  - compressed_tensors/quantization/quant_config.py: `config_groups` {name: {targets, weights,
    input_activations, output_activations}}, `ignore`, `format`, `quantization_status`;
  - compressed_tensors/compressors/quantized_compressors/ (int-quantized, float-quantized): each
    linear stores `weight` (int8 / float8_e4m3fn [out, in]) and `weight_scale` ([out, 1] for the
    channel strategy, [1] for tensor); static activations add `input_scale`;
  - vllm/model_executor/layers/quantization/compressed_tensors/compressed_tensors.py
    (`_is_dynamic_token_w8a8`, `_is_static_tensor_w8a8`, `_is_fp8_w8a8`): which schemes it runs;
    `targets` and `ignore` entries are a class name ("Linear"), a module name, or "re:<regex>".
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from lowbit.errors import LowbitError

QUANT_METHOD = "compressed-tensors"
FORMATS = {"int": "int-quantized", "float": "float-quantized"}  # weight type -> the compressor that stores it
INT8_MAX = 127  # symmetric int8: codes in [-127, 127] (we write); [-128, 127] read
FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass(frozen=True)
class W8A8Scheme:
    """One config group we can run: 8-bit weights of `weight_type`, and 8-bit activations of the same
    type, computed per token on the fly (`dynamic`) or with one stored scale per tensor."""

    weight_type: str  # "int" | "float"
    weight_strategy: str  # "channel" | "tensor"
    act_dynamic: bool  # True: per-token scales on the fly; False: a stored per-tensor `input_scale`

    @property
    def act_strategy(self) -> str:
        return "token" if self.act_dynamic else "tensor"

    def describe(self) -> str:
        w = "int8" if self.weight_type == "int" else "fp8 e4m3"
        act = "dynamic per token" if self.act_dynamic else "static per tensor"
        return f"{w} weights per {self.weight_strategy}, {w} activations {act}"


def _args(weight_type: str, strategy: str, dynamic: bool) -> dict:
    return {"num_bits": 8, "type": weight_type, "symmetric": True, "strategy": strategy, "dynamic": dynamic,
            "group_size": None, "block_structure": None, "actorder": None,
            "observer": None if dynamic else "minmax", "observer_kwargs": {}}


def quantization_config(scheme: W8A8Scheme, ignore: list[str] | None = None) -> dict:
    """The `quantization_config` of config.json for a checkpoint whose every Linear but `ignore`
    (lm_head, by full name the decoder linears left dense) holds `scheme`."""
    fmt = FORMATS[scheme.weight_type]
    group = {"targets": ["Linear"],
             "weights": _args(scheme.weight_type, scheme.weight_strategy, False),
             "input_activations": _args(scheme.weight_type, scheme.act_strategy, scheme.act_dynamic),
             "output_activations": None, "format": fmt}
    return {"quant_method": QUANT_METHOD, "format": fmt, "quantization_status": "compressed",
            "config_groups": {"group_0": group}, "ignore": ["lm_head", *(ignore or [])],
            "kv_cache_scheme": None, "sparsity_config": {}, "global_compression_ratio": None}


# ---- reading ----------------------------------------------------------------------------------
def _scheme_of(name: str, group: dict, fmt: str | None, where: str) -> W8A8Scheme:
    """The W8A8Scheme of one config group, or a LowbitError naming what we do not run."""
    w, a = group.get("weights"), group.get("input_activations")
    if group.get("output_activations"):
        raise LowbitError(f"{where}.config_groups.{name}: output_activations quantization is not run by lowbit")
    if not w:
        raise LowbitError(f"{where}.config_groups.{name}: no weights scheme (activation-only quantization "
                          f"is not run by lowbit)")
    if not a:
        raise LowbitError(f"{where}.config_groups.{name}: weight-only {w.get('type', 'int')}{w.get('num_bits')} "
                          f"(W{w.get('num_bits')}A16, strategy {w.get('strategy')}) is not run by lowbit's "
                          f"compressed-tensors reader; it runs W8A8 int8 and FP8")
    wt, at = str(w.get("type", "int")).lower(), str(a.get("type", "int")).lower()
    summary = (f"weights {wt}{w.get('num_bits')} {w.get('strategy')} symmetric={w.get('symmetric')}, "
               f"activations {at}{a.get('num_bits')} {a.get('strategy')} dynamic={a.get('dynamic')} "
               f"symmetric={a.get('symmetric')}")
    refuse = None
    if w.get("num_bits") != 8 or a.get("num_bits") != 8:
        refuse = "only 8-bit weights and activations are run"
    elif wt not in FORMATS or wt != at:
        refuse = "weights and activations must both be int or both float"
    elif str(w.get("strategy")).lower() not in ("channel", "tensor"):
        refuse = f"weight strategy {w.get('strategy')!r} (only channel and tensor are run)"
    elif w.get("group_size") not in (None, -1) or w.get("block_structure"):
        refuse = "grouped or block weight scales are not run"
    elif w.get("actorder"):
        refuse = "act-order weights are not run"
    elif not w.get("symmetric", True) or w.get("dynamic"):
        refuse = "weights must be symmetric and static"
    elif not a.get("symmetric", True):
        refuse = "asymmetric activations are not run"
    elif str(a.get("dynamic")).lower() == "local" or a.get("group_size") not in (None, -1):
        refuse = "grouped activation scales are not run"
    elif a.get("dynamic") and str(a.get("strategy")).lower() != "token":
        refuse = f"dynamic activations per {a.get('strategy')!r} (only per token is run)"
    elif not a.get("dynamic") and str(a.get("strategy")).lower() != "tensor":
        refuse = f"static activations per {a.get('strategy')!r} (only per tensor is run)"
    elif fmt is not None and fmt != FORMATS[wt]:
        refuse = f"format {fmt!r} (lowbit reads {FORMATS[wt]!r} for {wt} weights)"
    if refuse:
        raise LowbitError(f"{where}.config_groups.{name}: scheme ({summary}) is not supported: {refuse}")
    return W8A8Scheme(wt, str(w.get("strategy")).lower(), bool(a.get("dynamic")))


def _matches(pattern: str, name: str) -> bool:
    """A `targets` / `ignore` entry: "re:<regex>" against the full name, "Linear" (every linear, which
    is all that asks here), or a module name (a whole dotted suffix)."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == "Linear" or name == pattern or name.endswith("." + pattern)


def method_options(quant: dict, where: str):
    """-> options_for(layer name) -> W8A8Scheme or None (left dense), from a compressed-tensors
    `quantization_config`; every group is checked here, before a tensor is read."""
    status = quant.get("quantization_status", "compressed")
    if status != "compressed":
        raise LowbitError(f"{where}.quantization_status {status!r}: lowbit reads compressed checkpoints "
                          f"(integer / fp8 weights on disk), not {status!r} ones")
    sparsity = quant.get("sparsity_config") or {}
    if sparsity and str(sparsity.get("format", "dense")).lower() != "dense":
        raise LowbitError(f"{where}.sparsity_config: sparse format {sparsity.get('format')!r} is not run by lowbit")
    if quant.get("kv_cache_scheme"):
        raise LowbitError(f"{where}.kv_cache_scheme: a quantized KV cache scheme in the checkpoint is not run by "
                          f"lowbit (use --kv-bits at run time)")
    groups = quant.get("config_groups") or {}
    if not groups:
        raise LowbitError(f"{where}: no config_groups")
    top_fmt = quant.get("format")
    schemes = [(g.get("targets") or [], _scheme_of(n, g, g.get("format") or top_fmt, where)) for n, g in groups.items()]
    ignore = quant.get("ignore") or []

    def options_for(name: str) -> W8A8Scheme | None:
        if any(_matches(p, name) for p in ignore):
            return None
        return next((s for targets, s in schemes if any(_matches(t, name) for t in targets)), None)

    return options_for
