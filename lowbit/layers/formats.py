"""Which LinearMethod each projection of a checkpoint gets, from its `quantization_config`.

Keys are read the way transformers' AwqConfig / GPTQConfig read them (`utils/quantization_config.py`),
legacy spellings included: AWQ `bits`|`w_bit`, `group_size`|`q_group_size`, `version`|`format`;
GPTQ `checkpoint_format`|`format`, and GPTQModel's per-module `dynamic` overrides (regex -> bits /
group size), which `lowbit quantize mixed` writes. Anything we cannot run exactly is refused here,
before a tensor is read.
"""
from __future__ import annotations

import re

from lowbit.errors import LowbitError
from lowbit.layers.linear import make_method
from lowbit.formats import awq_format, compressed_tensors, gptq_format

import lowbit.layers.quantized_linear  # noqa: F401  (registers the awq and gptq methods)
import lowbit.layers.w8a8_linear  # noqa: F401  (registers the compressed-tensors w8a8 / fp8 method)


def _get(quant: dict, *keys, default=None):
    return next((quant[k] for k in keys if quant.get(k) is not None), default)


def _group_size(quant: dict, where: str) -> int:
    gs = _get(quant, "group_size", "q_group_size", default=-1)
    if not isinstance(gs, int) or (gs <= 0 and gs != -1):
        raise LowbitError(f"{where}.group_size {gs!r}: expected a positive integer or -1 (per output channel)")
    return gs


def awq_options(quant: dict, where: str) -> dict:
    bits = _get(quant, "bits", "w_bit")
    if bits not in awq_format.BITS:
        raise LowbitError(f"{where}.bits {bits!r}: the awq gemm layout stores 4-bit codes only")
    version = str(_get(quant, "version", "format", default="gemm")).lower()
    if version != "gemm":
        raise LowbitError(f"{where}.version {version!r}: lowbit reads AutoAWQ's 'gemm' layout only "
                          f"(re-export the model with version='gemm')")
    return {"bits": bits, "group_size": _group_size(quant, where), "zero_point": bool(quant.get("zero_point", True))}


def gptq_options(quant: dict, where: str) -> dict:
    bits = quant.get("bits")
    if bits not in gptq_format.BITS:
        raise LowbitError(f"{where}.bits {bits!r}: the gptq layout holds {', '.join(map(str, gptq_format.BITS))}-bit codes")
    fmt = str(_get(quant, "checkpoint_format", "format", default="gptq")).lower()
    if fmt not in gptq_format.FORMATS:
        raise LowbitError(f"{where}.checkpoint_format {fmt!r}: lowbit reads "
                          f"{' and '.join(map(repr, gptq_format.FORMATS))} (not marlin/bitblas repacks)")
    return {"bits": bits, "group_size": _group_size(quant, where), "zero_offset": gptq_format.FORMATS[fmt],
            "desc_act": bool(quant.get("desc_act", False)), "sym": bool(quant.get("sym", True))}


_OPTIONS = {"awq": awq_options, "gptq": gptq_options}
DYNAMIC_KEYS = ("bits", "group_size", "desc_act", "sym")  # the per-module overrides we can honour


def dynamic_override(dynamic: dict, name: str, where: str):
    """GPTQModel's per-module `dynamic` rule for module `name` (gptqmodel `dynamic_get`, vLLM
    `get_dynamic_override`): the first key whose regex `re.match`es the name decides; a "-:" key leaves
    the module unquantized (False), a "+:" or unprefixed key returns its overrides; no match: None."""
    for pattern, overrides in dynamic.items():
        negative = pattern.startswith("-:")
        regex = pattern[2:] if negative or pattern.startswith("+:") else pattern
        try:
            hit = re.match(regex, name)
        except re.error as e:
            raise LowbitError(f"{where}.dynamic key {pattern!r}: not a regular expression ({e})") from None
        if not hit:
            continue
        if negative:
            return False
        if not isinstance(overrides, dict):
            raise LowbitError(f"{where}.dynamic[{pattern!r}]: expected an object of overrides, got {overrides!r}")
        return overrides
    return None


def _with_dynamic(quant: dict, name: str, where: str):
    """The quant config that applies to module `name`: False (left dense) or the base config with
    the module's `dynamic` overrides merged in; overrides we cannot honour are refused by name."""
    dynamic = quant.get("dynamic")
    if not dynamic:
        return quant
    if not isinstance(dynamic, dict):
        raise LowbitError(f"{where}.dynamic: expected an object of regex -> overrides")
    overrides = dynamic_override(dynamic, name, where)
    if overrides is None or overrides is False:
        return overrides if overrides is False else quant
    unknown = [k for k in overrides if k not in DYNAMIC_KEYS]
    if unknown:
        raise LowbitError(f"{where}.dynamic: override {unknown[0]!r} for {name} is not supported "
                          f"(lowbit honours {', '.join(DYNAMIC_KEYS)})")
    return {**quant, **overrides}


def method_for_checkpoint(quant: dict | None, source: str = ""):
    """-> method_for(layer name, in_features, out_features): a LinearMethod, or None for dense."""
    if not quant:
        return lambda _name, _i, _o: None
    kind = str(quant.get("quant_method", "")).lower()
    where = f"{source}: quantization_config" if source else "quantization_config"
    if kind == compressed_tensors.QUANT_METHOD:  # a scheme per config group, chosen by layer name
        scheme_for = compressed_tensors.method_options(quant, where)

        def ct_method_for(name: str, _in: int, _out: int):
            scheme = scheme_for(name)
            return None if scheme is None else make_method("w8a8", scheme=scheme, prefix=name)

        return ct_method_for
    if kind not in _OPTIONS:
        raise LowbitError(f"{where}.quant_method {quant.get('quant_method')!r} is not supported "
                          f"(lowbit reads {', '.join(_OPTIONS)}, {compressed_tensors.QUANT_METHOD})")
    options = _OPTIONS[kind](quant, where)
    # AutoAWQ and transformers skip a module when any entry is a substring of its name
    skip = quant.get("modules_to_not_convert") or []
    if quant.get("dynamic") and kind != "gptq":
        raise LowbitError(f"{where}.dynamic: per-module overrides are read for gptq checkpoints only, not {kind}")

    def method_for(name: str, _in: int, _out: int):
        if any(key in name for key in skip):
            return None
        own = _with_dynamic(quant, name, where)  # GPTQModel's per-module bits / group size (quantize mixed)
        if own is False:
            return None
        return make_method(kind, prefix=name, **(options if own is quant else _OPTIONS[kind](own, f"{where} ({name})")))

    return method_for
