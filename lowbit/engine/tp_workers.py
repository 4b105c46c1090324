"""Tensor parallelism's processes: rank 0 is the process that made the `LLM` (scheduler, sampler,
the user's command); ranks 1..N-1 are worker processes it starts, one per GPU (or CPU process with
gloo). Each rank builds only its shard of the model, a layer at a time (`LlamaModel.build_shard`),
and the same model runner; then every step rank 0 broadcasts the step's inputs and all ranks run
the model together (the collectives inside it keep them in step), rank 0 alone sampling from the
gathered logits.

A worker that fails reports its error through a queue and exits; rank 0 raises it by rank. The
workers are daemon processes: they end with rank 0, and `TPWorkers.close` stops them first.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import socket
import traceback
from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.parallel import comm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSource:
    """How every rank gets the same model: a checkpoint path, or dummy weights by their recipe."""

    path: str | None = None
    dtype: str | torch.dtype = "auto"
    dummy: tuple | None = None  # (arch, w_bits, group_size, dtype, seed): build_dummy_model's arguments

    def load(self, device: torch.device, shard: tuple[int, int] | None = None):
        """-> (model, tokenizer, checkpoint) on `device`: whole, or only rank `shard[0]` of
        `shard[1]`'s part, built a layer at a time (a rank never holds the whole model)."""
        if self.dummy is not None:
            from lowbit.loading.dummy import build_dummy_model

            arch, w_bits, group_size, dtype, seed = self.dummy
            return build_dummy_model(arch, w_bits, group_size, dtype, device, seed, shard=shard)
        from lowbit.loading.loader import load_model

        return load_model(self.path, self.dtype, device, shard=shard)


def rank_device(device: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device.type == "cuda" else torch.device("cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dump_stacks_if_stuck() -> None:
    """With LOWBIT_HANG_DUMP_S=N, every N seconds each rank prints where its threads are (to
    stderr): what a hang in a collective shows (the 2-GPU runs with CUDA graphs)."""
    seconds = float(os.environ.get("LOWBIT_HANG_DUMP_S", "0") or 0)
    if seconds > 0:
        import faulthandler

        faulthandler.dump_traceback_later(seconds, repeat=True)


def _worker(rank: int, world: int, port: int, source: ModelSource, device_type: str, config, errors) -> None:
    """Rank `rank`'s life: join the group, load and shard the model, build the runner, then run
    every step rank 0 broadcasts until it sends None."""
    dump_stacks_if_stuck()
    runner = None
    try:
        device = rank_device(torch.device(device_type), rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:  # the ranks share the CPU's cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        comm.init(rank, world, port, device)
        model, _tokenizer, _ckpt = source.load(device, (rank, world))
        from lowbit.engine.model_runner import ModelRunner

        runner = ModelRunner(model, config.resolved(model.config))  # as LLMEngine resolves it on rank 0
        while True:
            msg = comm.broadcast_object()
            if msg is None:
                break
            kind, step, arg = msg  # ModelRunner.run / run_steps say what rank 0 runs
            with torch.inference_mode():
                if kind == "run":  # `arg` greedy decode steps from CUDA graphs
                    for _tokens in runner.graphs.run_steps(step, arg):
                        pass
                else:  # one step, `arg`: whether from a CUDA graph
                    runner.execute(step, arg)
    except BaseException as e:  # noqa: BLE001 - reported to rank 0, which raises it
        errors.put((rank, f"{type(e).__name__}: {e}", traceback.format_exc()))
        raise SystemExit(1)
    finally:
        if runner is not None:
            try:
                runner.release_graphs()  # before destroy_process_group, which a live graph hangs
            except Exception:  # noqa: BLE001 - a failed device still lets the group close
                pass
        comm.close()


class TPWorkers:
    """Ranks 1..world-1 as worker processes; this process joins as rank 0."""

    def __init__(self, world: int, source: ModelSource, device: torch.device, config):
        self.world = world
        ctx = mp.get_context("spawn")  # CUDA cannot be forked; spawn is the same on the CPU
        self.errors = ctx.Queue()
        dump_stacks_if_stuck()  # rank 0's stacks too
        port = free_port()
        self.procs = [ctx.Process(target=_worker, args=(r, world, port, source, device.type, config, self.errors),
                                  name=f"lowbit-tp-rank{r}", daemon=True) for r in range(1, world)]
        for p in self.procs:
            p.start()
        try:
            comm.init(0, world, port, rank_device(device, 0))
        except Exception as e:
            self.close()
            raise self.failure(e) from e

    def failure(self, exc: BaseException) -> LowbitError:
        """A collective failed: the error of the rank that caused it, where one reported."""
        try:
            rank, msg, tb = self.errors.get(timeout=1)
            log.error("tensor-parallel rank %d failed:\n%s", rank, tb)
            return LowbitError(f"tensor-parallel rank {rank} failed: {msg}")
        except queue.Empty:
            dead = [p.name for p in self.procs if not p.is_alive()]
            return LowbitError(f"tensor parallelism failed ({type(exc).__name__}: {exc})"
                               + (f"; stopped: {', '.join(dead)}" if dead else ""))

    def close(self) -> None:
        """Tells the workers to stop (if the group is up), then ends them."""
        if comm.world() > 1:
            try:
                comm.broadcast_object(None)
            except Exception:  # a worker already gone: nothing to tell
                pass
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
        comm.close()
