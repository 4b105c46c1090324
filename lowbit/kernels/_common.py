"""What the kernel modules share: output allocation, device facts, and the per-shape config tuner.

Nothing here defines a Triton kernel, so importing it never fixes the interpreter/GPU choice
(`@triton.jit` reads TRITON_INTERPRET when it decorates, i.e. when a kernel module is imported).
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Hashable, Sequence

import torch

from lowbit.kernels import tune_cache

# Tests set this to prove every output element is written: kernel outputs and split-K workspaces
# are then born as NaN instead of uninitialised memory (which is often zeros, hiding misses).
POISON = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def new_empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Multiprocessors of `device`; 4 off the GPU so that the interpreter still takes split paths."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# ---- per-shape tuning --------------------------------------------------------------------------
# Configs chosen by timing, keyed by (kernel family, shape bucket, dtypes...). LOWBIT_AUTOTUNE=0
# keeps the heuristic config (tests do, to bound compile time); tuning never runs under the
# interpreter or while a CUDA graph is being captured (timing would break the capture).
_TUNED: dict[Hashable, object] = {}
TUNE_LOG: list[dict] = []  # one entry per tuned key: what was tried and how long each took (ms)


def autotune_enabled() -> bool:
    return os.environ.get("LOWBIT_AUTOTUNE", "1") != "0" and not interpreting()


def graph_time_ms(calls: Sequence[Callable[[], object]], reps: int = 20, trials: int = 5) -> float:
    """Median time per call of `reps` calls (round robin over `calls`) replayed from one CUDA graph:
    no CPU launch overhead, as the engine runs decode. Calls run once first, outside the capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            calls[i % len(calls)]()
    graph.replay()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    del graph
    return sorted(times)[len(times) // 2]


_FLUSH: dict = {}


def _flush_cost(device: torch.device):
    """A buffer larger than L2 whose zeroing evicts the weights, and what zeroing it costs (ms)."""
    if device not in _FLUSH:
        buf = torch.empty(128 * 1024 * 1024, dtype=torch.int8, device=device)
        _FLUSH[device] = (buf, graph_time_ms([buf.zero_], reps=10))
    return _FLUSH[device]


def pick_config(key: Hashable, candidates: Callable[[], Sequence], run: Callable[[object], None], device: torch.device):
    """The fastest of `candidates()` for `key` (the first when tuning is off), cached per process
    and on disk per GPU model and kernel source (tune_cache.py).

    Each candidate is timed in a CUDA graph after an L2 flush (the weights come from HBM, as in a
    model whose layers follow one another), minus the flush's own time."""
    hit = _TUNED.get(key)
    if hit is not None:
        return hit
    cands = candidates()
    if len(cands) == 1 or device.type != "cuda" or not autotune_enabled():
        return cands[0]
    if torch.cuda.is_current_stream_capturing():
        return cands[0]
    disk = tune_cache.cache_file(torch.cuda.get_device_name(device), tune_cache.versions())
    stored = tune_cache.lookup(disk, key, cands)
    if stored is not None:  # timed by an earlier process on this GPU model and kernel source
        _TUNED[key] = stored
        TUNE_LOG.append({"key": repr(key), "best": repr(stored), "best_ms": None, "from_disk": str(disk)})
        return stored
    buf, flush_ms = _flush_cost(device)
    timings = []
    for cfg in cands:
        try:
            ms = graph_time_ms([lambda: (buf.zero_(), run(cfg))], reps=10) - flush_ms
        except Exception as exc:  # a config the compiler rejects (e.g. out of shared memory) is skipped
            timings.append((float("inf"), cfg, f"{type(exc).__name__}: {str(exc)[:120]}"))
            continue
        timings.append((ms, cfg, None))
    best = min(timings, key=lambda t: t[0])
    if best[0] == float("inf"):
        raise RuntimeError(f"no config ran for {key}: {timings[0][2]}")
    _TUNED[key] = best[1]
    tune_cache.store(disk, key, best[1])
    TUNE_LOG.append({"key": repr(key), "best": repr(best[1]), "best_ms": best[0],
                     "tried": [(repr(c), ms, err) for ms, c, err in timings]})
    return best[1]
