"""Programmatic dependent launch (PDL, compute capability >= 9.0) for the decode step's kernels.

A decode step is a chain of small kernels, each waiting for the one before; between two of them
the GPU idles for about a microsecond while the next grid launches (~0.3 ms of a batch-1 step).
With PDL a kernel launched with `launch_pdl` may start while its predecessor still runs, once every
program of the predecessor has signalled (`gdc_launch_dependents`, which our kernels do first);
it must then wait (`gdc_wait`) for the predecessor to finish and flush before it reads anything the
predecessor wrote. Every kernel launched this way waits, so each finished kernel implies all the
ones before it did too. What a kernel may do before waiting: touch data no kernel of the step
writes, e.g. prefetch its weights into L2 (`prefetch_l2`).

On by default on Hopper and later for batch-1 decode (`LOWBIT_PDL=0` turns it off; the interpreter
and older GPUs never use it); the engine captures its larger decode batches with it off
(`allowed(False)`). Measured on the H100 (benchmarks/README.md, "Programmatic dependent launch"):
the W4A16 7B engine at batch 1 decodes at 428 tokens/s with it against 358 without it on the same
machine (benchmarks/results/profile_decode_llama2-7b_w4_gemvc_h100_b.json, _gemvc_pdl_h100.json),
the CUDA gemv's weight requests being issued before its wait; fp16 gave 170 tokens/s with it
against 156-164 without it. At concurrency 16 / 64 it cost W4A16 speed (3259 / 5576 tokens/s with
it, 3528 / 6103 without it on another machine of the kind), hence batch 1 only. The Triton
tensor-core W4A16 kernels are never launched with it (w4a16.py says why). Every kernel test passes
with it, and a W4A16 7B model with dummy weights decodes the same greedy tokens with and without it.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from lowbit.kernels._common import interpreting


@functools.lru_cache(maxsize=None)
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


_ALLOWED = [True]  # a stack: the innermost `allowed` scope decides


@contextlib.contextmanager
def allowed(flag: bool):
    """Kernels launched inside this scope use PDL only if `flag` (and the device and env allow it)."""
    _ALLOWED.append(flag)
    try:
        yield
    finally:
        _ALLOWED.pop()


def use_pdl(device: torch.device) -> bool:
    """Whether kernels on `device` are launched as programmatic dependents."""
    if not _ALLOWED[-1] or device.type != "cuda" or interpreting() or os.environ.get("LOWBIT_PDL", "1") == "0":
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


def launch_options(device: torch.device) -> dict:
    """Keyword arguments for a kernel launch: (USE_PDL constexpr, launch_pdl)."""
    return {"USE_PDL": True, "launch_pdl": True} if use_pdl(device) else {"USE_PDL": False}


@triton.jit
def pdl_begin(USE_PDL: tl.constexpr):
    """Let the next kernel launch, then wait until the previous one has finished and flushed."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


@triton.jit
def prefetch_l2(ptrs, USE_PDL: tl.constexpr):
    """A hint: bring the 128-byte lines at `ptrs` into L2 (before pdl_begin, for constant data)."""
    if USE_PDL:
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];", "=r,l", [ptrs], dtype=tl.int32,
                                  is_pure=False, pack=1)
