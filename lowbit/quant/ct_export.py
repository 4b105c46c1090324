"""Write a W8A8 / FP8 model as a compressed-tensors checkpoint (the layout vLLM, SGLang and LMDeploy
read; lowbit/formats/compressed_tensors.py cites its definition): config.json with
`quantization_config`, model.safetensors with each quantized linear's `weight` (int8 or
float8_e4m3fn [out, in]), `weight_scale` (float32 [out, 1]) and, for static activations,
`input_scale` (float32 [1]); everything else in fp16. Built in a hidden sibling and renamed at the
end (`atomic_output_dir`), so a failure leaves nothing that looks complete.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from lowbit.errors import LowbitError
from lowbit.formats.compressed_tensors import W8A8Scheme, quantization_config
from lowbit.quant.export import check_quantized_names, write_checkpoint
from lowbit.quant.w8a8 import W8Weight


def checkpoint_tensors(net, qweights: dict[str, W8Weight]) -> Iterator[tuple[str, torch.Tensor]]:
    for name, t in net.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        if owner in qweights and leaf == "weight":
            qw = qweights[owner]
            yield f"{owner}.weight", qw.weight.contiguous().cpu()
            yield f"{owner}.weight_scale", qw.weight_scale.float().reshape(-1, 1).cpu()
            if qw.input_scale is not None:
                yield f"{owner}.input_scale", qw.input_scale.float().reshape(1).cpu()
            continue
        yield name, t.detach().to("cpu", torch.float16)


def save_w8a8(work_dir: str | Path, net, qweights: dict[str, W8Weight], scheme: W8A8Scheme, tokenizer, *,
              overwrite: bool = False, extra_config: dict | None = None) -> Path:
    """Write `net` (dense, smoothed norms included) with its linears from `qweights` to work_dir."""
    if not qweights:
        raise LowbitError("nothing to write: no quantized linear layers")
    dense = check_quantized_names(net, qweights)
    qconfig = {**quantization_config(scheme, dense), **(extra_config or {})}
    return write_checkpoint(Path(work_dir), net, tokenizer, checkpoint_tensors(net, qweights), qconfig, overwrite)
