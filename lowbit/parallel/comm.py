"""The tensor-parallel group of this process and the two collectives a sharded model needs.

torch.distributed carries them (NCCL between GPUs, gloo on the CPU): one process per rank, all in
one group. Rank 0 is the front process (scheduler, sampler, the user's command); ranks 1..N-1 are
workers (engine/tp_workers.py). Layers ask `world()` and call `all_reduce` / `all_gather` on their
outputs; with no group (one process) both are identities, so a model runs the same code either way.
"""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

# Collectives that wait longer than this raise instead of hanging (a rank that died mid-step).
TIMEOUT = datetime.timedelta(seconds=120)
_HOST_GROUP = [None]  # gloo beside NCCL: the step's inputs go host to host, with no GPU sync


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init(rank: int, world_size: int, port: int, device: torch.device) -> None:
    """Joins (or, for rank 0, opens) the group of `world_size` ranks on this host."""
    dist.init_process_group(backend_for(device), init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=TIMEOUT,
                            **({"device_id": device} if device.type == "cuda" else {}))
    _HOST_GROUP[0] = dist.new_group(backend="gloo", timeout=TIMEOUT) if device.type == "cuda" else None


def close() -> None:
    _HOST_GROUP[0] = None
    if dist.is_initialized():
        dist.destroy_process_group()


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum of x over the ranks, in place (a row-parallel layer's partial products)."""
    if world() > 1:
        dist.all_reduce(x)
    return x


def all_gather_last(x: torch.Tensor) -> torch.Tensor:
    """The ranks' x concatenated along the last dim in rank order (a column-parallel output)."""
    n = world()
    if n == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def broadcast_object(obj=None):
    """Rank 0's `obj` on every rank (the step's inputs from the scheduler's process)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_HOST_GROUP[0])
    return box[0]


def min_over_ranks(value: int) -> int:
    if world() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_HOST_GROUP[0])
    return int(t.item())
