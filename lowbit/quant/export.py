"""Write a quantized model as an HF directory that AutoAWQ / GPTQ readers (and our loader) take:
config.json with `quantization_config`, *.safetensors with the packed linears and everything else
in fp16, the tokenizer, generation_config.json. Built in a hidden sibling and renamed at the end
(`atomic_output_dir`), so a failure, a full disk included, leaves nothing that looks complete.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Iterator

import torch

from lowbit.atomic_dir import atomic_output_dir
from lowbit.errors import LowbitError
from lowbit.formats import awq_format, gptq_format
from lowbit.loading.hf_writer import write_json, write_tensors
from lowbit.quant.driver import LINEAR_NAMES
from lowbit.quant.qweight import QuantizedWeight

LAYOUT_BITS = {"awq": awq_format.BITS, "gptq": gptq_format.BITS}


def quantization_config(fmt: str, qweights: dict[str, QuantizedWeight], dense: list[str] | None = None) -> dict:
    """The `quantization_config` of config.json, with the keys transformers' AwqConfig / GPTQConfig read;
    `dense` names linears left unquantized (written as `modules_to_not_convert`). Refuses what the
    layout cannot store: other bit widths, mixed settings (but for gptq's per-linear bits and group
    sizes, see _mixed_gptq_config), g_idx in awq."""
    if fmt not in LAYOUT_BITS:
        raise LowbitError(f"--format {fmt!r}: expected awq or gptq")
    if not qweights:
        raise LowbitError("nothing to write: no quantized linear layers")
    first_name, first = next(iter(qweights.items()))
    for name, qw in qweights.items():
        if qw.bits not in LAYOUT_BITS[fmt]:
            raise LowbitError(f"--format {fmt} stores {', '.join(map(str, LAYOUT_BITS[fmt]))}-bit codes, not "
                              f"{qw.bits}-bit ({name})")
    if fmt == "gptq" and len({(qw.bits, qw.group_size) for qw in qweights.values()}) > 1:
        return _mixed_gptq_config(qweights, dense)
    for name, qw in qweights.items():  # one config for the whole checkpoint
        if (qw.bits, qw.group_size, qw.symmetric) != (first.bits, first.group_size, first.symmetric):
            raise LowbitError(f"{name}: w{qw.bits} g{qw.group_size} sym={qw.symmetric} differs from {first_name}'s "
                              f"w{first.bits} g{first.group_size} sym={first.symmetric}; one checkpoint holds one setting")
    act_order = [n for n, qw in qweights.items() if qw.g_idx is not None]
    if fmt == "awq":
        if act_order:
            raise LowbitError(f"{act_order[0]}: has an act-order g_idx, which the awq layout cannot store; "
                              f"use --format gptq")
        return {"quant_method": "awq", "bits": first.bits, "group_size": first.group_size,
                "zero_point": not first.symmetric, "version": "gemm", "modules_to_not_convert": dense or None}
    config = {"quant_method": "gptq", "bits": first.bits, "group_size": first.group_size, "desc_act": bool(act_order),
              "sym": first.symmetric, "checkpoint_format": "gptq"}
    return {**config, "modules_to_not_convert": dense} if dense else config


def _mixed_gptq_config(qweights: dict[str, QuantizedWeight], dense: list[str] | None) -> dict:
    """Per-linear bits / group sizes (quantize mixed) as GPTQModel's `dynamic` override, which vLLM's
    GPTQ config reads too: the most common setting is the base, every other linear gets an entry
    `"+:^model\\.layers\\.3\\.mlp\\.down_proj$": {"bits": 6, "group_size": 32}` (the first regex that
    `re.match`es a module name wins; "-:" entries, which we do not write, would leave it dense)."""
    settings = Counter((qw.bits, qw.group_size) for qw in qweights.values())
    (bits, group_size), _ = settings.most_common(1)[0]
    symmetric = {qw.symmetric for qw in qweights.values()}
    if len(symmetric) > 1:
        raise LowbitError("mixed gptq checkpoint: every linear must be symmetric or every one asymmetric")
    dynamic = {f"+:^{re.escape(name)}$": {"bits": qw.bits, "group_size": qw.group_size}
               for name, qw in qweights.items() if (qw.bits, qw.group_size) != (bits, group_size)}
    config = {"quant_method": "gptq", "bits": bits, "group_size": group_size,
              "desc_act": any(qw.g_idx is not None for qw in qweights.values()), "sym": symmetric.pop(),
              "checkpoint_format": "gptq", "dynamic": dynamic}
    return {**config, "modules_to_not_convert": dense} if dense else config


def packed_tensors(name: str, qw: QuantizedWeight, fmt: str) -> dict[str, torch.Tensor]:
    """One linear's checkpoint tensors, keyed by full name (`{name}.qweight`, ...)."""
    if fmt == "awq":
        parts = awq_format.pack(qw.codes, qw.scales, qw.zeros)
    else:
        parts = gptq_format.pack(qw.codes, qw.scales, qw.zeros, qw.bits, qw.group_size, qw.g_idx)
    return {f"{name}.{k}": v for k, v in parts.items()}


def checkpoint_tensors(net, qweights: dict[str, QuantizedWeight], fmt: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint in the model's order: packed linears where a QuantizedWeight
    exists, fp16 for the rest (embeddings, norms, biases, an untied lm_head)."""
    for name, t in net.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        if owner in qweights:
            if leaf == "weight":
                yield from packed_tensors(owner, qweights[owner], fmt).items()
                continue
            if leaf != "bias":
                raise LowbitError(f"{name}: {owner} is already quantized; quantize the full-precision model")
        yield name, t.detach().to("cpu", torch.float16)


def check_quantized_names(net, qweights: dict) -> list[str]:
    """The decoder linears left dense, by full name (which the readers match as a substring); refuses
    quantized names the model does not have."""
    state = net.state_dict()
    missing = [n for n in qweights if f"{n}.weight" not in state]
    if missing:
        raise LowbitError(f"{missing[0]}: quantized, but the model has no such linear layer")
    return [f"model.layers.{i}.{n}" for i in range(len(net.layers)) for n in LINEAR_NAMES
            if f"model.layers.{i}.{n}" not in qweights]


def write_checkpoint(out: Path, net, tokenizer, tensors: Iterator[tuple[str, torch.Tensor]], qconfig: dict,
                     overwrite: bool, extra_json: dict[str, dict] | None = None) -> Path:
    """An HF directory: config.json with `quantization_config`, generation_config.json, the tokenizer
    and model.safetensors from `tensors` (and `extra_json`: file name -> content), built in a hidden
    sibling and renamed at the end."""
    cfg = net.config
    hf = cfg.to_hf()
    if cfg.family == "internlm2":  # our loader already split wqkv: write it as the Llama it now is
        hf.update(architectures=["LlamaForCausalLM"], model_type="llama")
    hf.update(torch_dtype="float16", quantization_config=qconfig)
    gen = {"bos_token_id": cfg.bos_token_id if cfg.bos_token_id is not None else tokenizer.bos_token_id,
           "eos_token_id": cfg.eos_token_id if cfg.eos_token_id is not None else tokenizer.eos_token_id}
    try:
        with atomic_output_dir(out, overwrite) as tmp:
            write_tensors(tmp, tensors, metadata={"quant_method": qconfig["quant_method"]})
            write_json(tmp / "config.json", hf)
            if qconfig.get("dynamic"):  # GPTQModel reads per-module overrides from its own file
                write_json(tmp / "quantize_config.json", qconfig)
            write_json(tmp / "generation_config.json", gen)
            tokenizer.save(tmp)
            for name, content in (extra_json or {}).items():
                write_json(tmp / name, content)
    except OSError as e:  # atomic_output_dir turns ENOSPC into a LowbitError; anything else lands here
        raise LowbitError(f"{out}: could not write the checkpoint ({e.strerror or e}); nothing was left behind") from None
    return out


def save_quantized(work_dir: str | Path, net, qweights: dict[str, QuantizedWeight], fmt: str, tokenizer, *,
                   overwrite: bool = False, extra_config: dict | None = None,
                   extra_json: dict[str, dict] | None = None) -> Path:
    """Write `net` (dense, with the dequantized weights) with its linears packed from `qweights` into
    work_dir in the awq or gptq layout; returns work_dir. extra_config is merged into
    `quantization_config` (quantize passes {"lowbit": the options it ran with})."""
    dense = check_quantized_names(net, qweights)
    qconfig = {**quantization_config(fmt, qweights, dense), **(extra_config or {})}
    return write_checkpoint(Path(work_dir), net, tokenizer, checkpoint_tensors(net, qweights, fmt), qconfig, overwrite,
                            extra_json)
