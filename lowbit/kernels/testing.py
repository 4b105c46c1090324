"""What the kernel tests share: the CPU-interpreter switch, poisoned outputs, the error measure.

Kernels run on CUDA when there is one, else under Triton's interpreter. `@triton.jit` reads
TRITON_INTERPRET when it decorates, i.e. when a kernel module is first imported, so
`device_for_tests()` must run before the test module imports any kernel module; a kernel module
imported earlier for the GPU (by another test module, through lowbit.layers) is reloaded.
"""
from __future__ import annotations

import importlib
import os
import sys

import torch

# dependency order: a module is reloaded after the modules whose kernels it calls
_KERNEL_MODULES = ("tile_order", "w4a16", "kv_tile", "kv_write", "paged_attention", "prefill_attention", "rmsnorm", "rotary",
                   "activation", "w8a8")


def device_for_tests() -> torch.device:
    os.environ.setdefault("LOWBIT_AUTOTUNE", "0")  # heuristic configs: bounded compile time on the GPU
    from lowbit.kernels import _common

    _common.POISON = True  # outputs and workspaces start as NaN: a missed element fails the test
    if torch.cuda.is_available():
        return torch.device("cuda")
    os.environ["TRITON_INTERPRET"] = "1"
    _interpret_triton_stdlib()
    for name in _KERNEL_MODULES:
        mod = sys.modules.get(f"lowbit.kernels.{name}")
        if mod is not None and getattr(mod, "_TRITON_INTERPRET", True) is False:
            importlib.reload(mod)
    return torch.device("cpu")


def _interpret_triton_stdlib() -> None:
    """Triton's own @jit library (tl.max, tl.sum, tl.cdiv, ...) is decorated when triton is first
    imported; if something imported triton before the interpreter was switched on, redo it."""
    std = sys.modules.get("triton.language.standard")
    if std is None:
        return  # triton not imported yet: it will read TRITON_INTERPRET itself
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(std.max, InterpretedFunction):
        return
    import triton.language as tl

    std = importlib.reload(std)  # re-runs the decorators, which also re-attach tensor methods
    for name, value in vars(std).items():
        if isinstance(value, InterpretedFunction) and hasattr(tl, name):
            setattr(tl, name, value)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere in out gives inf."""
    out, ref = out.double().cpu(), ref.double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp(min=1e-30))
