"""Which LinearMethod each projection of a checkpoint gets, from its `quantization_config`."""
from __future__ import annotations

from lowbit.errors import LowbitError
from lowbit.layers.linear import make_method


def method_for_checkpoint(quant: dict | None, source: str = ""):
    if not quant:
        return lambda _name, _i, _o: None
    kind = quant.get("quant_method")
    raise LowbitError(f"{source}: quantization_config.quant_method {kind!r} is not supported")
