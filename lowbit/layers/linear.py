"""One quantized-linear abstraction for every weight format.

A `LinearMethod` (vLLM's quant-method idea) owns a format: it creates the layer's tensors under
the names the checkpoint uses, and applies the matmul. `QLinear` is the module the model holds;
the model never learns which method is inside. New formats register with `register_method`.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.layers import cpu_weights
from lowbit.parallel import comm


class LinearMethod:
    """A weight format: which tensors a layer holds, and how `y = x @ W^T + b` is computed."""

    name = "base"

    def create_weights(self, layer: "QLinear", dtype: torch.dtype) -> None:
        raise NotImplementedError

    def apply(self, layer: "QLinear", x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self, layer: "QLinear") -> torch.Tensor:
        """The dense [out, in] weight this layer represents (for checks and re-quantization)."""
        raise NotImplementedError

    def after_load(self, layer: "QLinear") -> None:
        """Called once all tensors are loaded: repack for a kernel, drop what is not needed."""

    def select(self, layer: "QLinear", dim: int, index: torch.Tensor) -> None:
        """Keeps only the outputs (dim 0) or inputs (dim 1) `index` of the loaded weight: a tensor-
        parallel rank's shard (QLinear.shard). Called after `after_load`."""
        raise LowbitError(f"{self.name} weights cannot be split for tensor parallelism")

    def output_dim(self, tensor: str) -> int | None:
        """The dim of tensor `tensor` (a name create_weights made) that runs over output features,
        along which a merged layer's shards are concatenated; None for a tensor all outputs share
        (GPTQ's g_idx), which every shard must then hold alike."""
        return 0


class DenseMethod(LinearMethod):
    """fp32 / fp16 / bf16 weights, `weight` [out, in] as in every HF checkpoint."""

    name = "dense"

    def create_weights(self, layer, dtype):
        layer.weight = nn.Parameter(torch.empty(layer.out_features, layer.in_features, dtype=dtype), requires_grad=False)

    def apply(self, layer, x):
        return dense_linear(x, layer.weight, layer.bias)

    def dequantize(self, layer):
        return layer.weight.data

    def select(self, layer, dim, index):
        w = layer.weight.data.index_select(dim, index.to(layer.weight.device)).contiguous()
        layer.weight = nn.Parameter(w, requires_grad=False)


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T + bias; a CPU decode call reads an fp16 copy of the weight, or with
    LOWBIT_CPU_DECODE=int8 an int8 one (cpu_weights.py says why: fewer bytes in a bandwidth-bound step)."""
    copy = cpu_weights.decode_copy(x)
    if copy == "int8":
        return cpu_weights.int8_linear(x, cpu_weights.dense_int8(weight), bias)
    if copy == "fp16":
        weight16 = cpu_weights.half_copy(weight)
        if weight16 is not None:
            return cpu_weights.half_linear(x, weight16, bias)
    return nn.functional.linear(x, weight, bias)


_METHODS: dict[str, Callable[..., LinearMethod]] = {"dense": DenseMethod}


def register_method(name: str, factory: Callable[..., LinearMethod]) -> None:
    _METHODS[name] = factory


def make_method(name: str, **kwargs) -> LinearMethod:
    if name not in _METHODS:
        raise LowbitError(f"weight format {name!r} is not known; known: {', '.join(sorted(_METHODS))}")
    return _METHODS[name](**kwargs)


class QLinear(nn.Module):
    """y = x @ W^T + b in the format of `method`. A merged layer (gpt-fast's wqkv, vLLM's
    QKVParallelLinear) holds several projections of the same input as one weight: `shards` names
    each projection as the checkpoint does, with its output features, in output order; the loader
    concatenates their tensors along each tensor's output dim and the caller splits y."""

    def __init__(self, in_features: int, out_features: int, bias: bool, method: LinearMethod | None = None,
                 dtype: torch.dtype = torch.float32, shards: list[tuple[str, int]] | None = None):
        super().__init__()
        if shards is not None and sum(n for _, n in shards) != out_features:
            raise LowbitError(f"merged linear: shards {shards} do not add up to out_features {out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.shards = shards
        self.method = method or DenseMethod()
        self.method.create_weights(self, dtype)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        self.parallel: str | None = None  # set by shard(): how this rank's outputs combine with the others'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.method.apply(self, x)
        if self.parallel == "row":  # each rank multiplied its slice of the inputs: partial sums
            return comm.all_reduce(y)
        if self.parallel == "column_gather":  # each rank made a slice of the outputs
            return comm.all_gather_last(y)
        return y

    def shard(self, style: str, rank: int, world: int) -> None:
        """Keeps rank `rank`'s part of the weight, Megatron-LM's split: 'column' keeps 1/world of
        the outputs (of each projection of a merged layer alike, so `split` still cuts q/k/v), whose
        results stay on this rank; 'column_gather' the same, gathered after the matmul; 'row' keeps
        1/world of the inputs, and the ranks' partial products are summed after it (the bias is
        added on rank 0 only)."""
        if style in ("column", "column_gather"):
            index, kept, start = [], [], 0
            for name, n in self.shards or [(None, self.out_features)]:
                if n % world:
                    raise LowbitError(f"{getattr(self.method, 'prefix', '') or 'a linear layer'}"
                                      f"{f' ({name})' if name else ''}: {n} outputs do not split over {world} ranks")
                part = n // world
                index.append(torch.arange(start + rank * part, start + (rank + 1) * part))
                kept.append((name, part))
                start += n
            index = torch.cat(index)
            self.method.select(self, 0, index)
            if self.bias is not None:
                self.bias = nn.Parameter(self.bias.data[index.to(self.bias.device)], requires_grad=False)
            self.out_features = len(index)
            if self.shards:
                self.shards = kept
        elif style == "row":
            if self.in_features % world:
                raise LowbitError(f"{getattr(self.method, 'prefix', '') or 'a linear layer'}: {self.in_features} "
                                  f"inputs do not split over {world} ranks")
            part = self.in_features // world
            self.method.select(self, 1, torch.arange(rank * part, (rank + 1) * part))
            self.in_features = part
            if self.bias is not None and rank != 0:
                self.bias = None
        else:
            raise LowbitError(f"tensor-parallel style {style!r}: expected column, column_gather or row")
        self.parallel = style

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A merged layer's output -> one view per shard."""
        return y.split([n for _, n in self.shards], dim=-1)

    def dequantized_weight(self) -> torch.Tensor:
        return self.method.dequantize(self)

    def extra_repr(self) -> str:
        merged = f", shards={[name for name, _ in self.shards]}" if self.shards else ""
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, format={self.method.name}{merged}"


def projections(prefix: str, name: str, names_out: list[tuple[str, int]], in_features: int, bias: bool,
                method_for: Callable[[str, int, int], LinearMethod | None], dtype, fused: bool
                ) -> dict[str, QLinear]:
    """The projections of one input (names_out: checkpoint name and out_features of each): with
    `fused` one QLinear `name` over their concatenated weights (the loader joins the checkpoint's
    tensors, the caller splits the output with `QLinear.split`), else one QLinear each under its own
    name. Projections of different formats (a checkpoint that skips some) are never merged."""
    methods = [method_for(f"{prefix}.{n}", in_features, o) for n, o in names_out]
    if fused and len({getattr(m, "name", "dense") for m in methods}) == 1:
        out = sum(o for _, o in names_out)
        method = method_for(f"{prefix}.{names_out[0][0]}", in_features, out)
        if method is not None:
            method.prefix = f"{prefix}.{name} ({'+'.join(n for n, _ in names_out)})"  # for its error messages
        return {name: QLinear(in_features, out, bias, method, dtype, shards=list(names_out))}
    return {n: QLinear(in_features, o, bias, m, dtype) for (n, o), m in zip(names_out, methods)}
