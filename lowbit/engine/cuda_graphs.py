"""Decode steps replayed from CUDA graphs, one graph per batch size.

A decode step launches hundreds of small kernels whose launch cost, at batch 1, is as long as
the work; a graph replays them with one launch. Each graph reads its inputs from static buffers
(token, position, slot, block table, context length per row) and writes logits and greedy
tokens to static outputs. A batch of n sequences runs the smallest graph of at least n rows;
the extra rows write into a scratch block that the block manager never hands out and attend
over one token of it, so they touch no sequence's cache. Context lengths vary inside the
kernel (through context_lens), never in the shapes, so one graph serves every length.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from lowbit.layers.paged_kv_cache import PagedAttentionMetadata, PagedKVCache


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... up to max_batch_size, and max_batch_size itself."""
    sizes, b = [], 1
    while b < max_batch_size:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch_size]


@dataclass
class StepInputs:
    """One step's inputs on the host, packed decode-first (see ModelRunner.prepare)."""

    input_ids: list[int]  # [T]
    positions: list[int]  # [T]
    slot_mapping: list[int]  # [T]
    block_tables: torch.Tensor  # [S, max_blocks] int32
    context_lens: list[int]  # [S]
    query_lens: list[int]  # [S]
    sample_rows: list[int]  # rows of T whose token completes its sequence, so a token is sampled


class DecodeGraphs:
    def __init__(self, forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], cache: PagedKVCache,
                 max_batch_size: int, max_blocks_per_seq: int, scratch_block: int, device: torch.device):
        """forward(input_ids [n], positions [n]) -> fp32 logits [n, vocab] over the cache's metadata."""
        self.forward = forward
        self.cache = cache
        self.sizes = graph_batch_sizes(max_batch_size)
        n = self.sizes[-1]
        self.scratch_block = scratch_block
        self.scratch_slot = scratch_block * cache.block_size
        # static inputs: graph b reads rows [:b]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), self.scratch_slot, dtype=torch.int64, device=device)
        self.block_tables = torch.full((n, max_blocks_per_seq), scratch_block, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.graphs: dict[int, Callable[[], tuple[torch.Tensor, torch.Tensor]]] = {}  # batch size -> replay
        self.pool = None  # the memory pool all graphs share

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    def _metadata(self, b: int) -> PagedAttentionMetadata:
        # lengths live on the device only: the decode kernel reads them, nothing on the host may
        return PagedAttentionMetadata(self.slot_mapping[:b], self.block_tables[:b], self.context_lens[:b],
                                      num_decode=b, query_lens=[1] * b, context_lens_host=None)

    @torch.inference_mode()
    def capture(self) -> None:
        for b in reversed(self.sizes):  # largest first: the smaller graphs fit in its memory pool
            self.cache.set_metadata(self._metadata(b))
            self.graphs[b] = self._capture(b)

    def _capture(self, b: int) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        """-> replay(), which reruns the step on the static inputs' rows [:b] and returns the
        static (logits [b, vocab], greedy tokens [b])."""
        from lowbit.kernels import pdl  # Triton: only where graphs are captured (a GPU)

        # programmatic dependent launch pays at batch 1 and costs at larger batches (kernels/pdl.py)
        with pdl.allowed(b == 1):
            # warm-up outside the capture: Triton compiles and tunes on its first call
            self.forward(self.input_ids[:b], self.positions[:b])
            torch.cuda.synchronize()
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                logits = self.forward(self.input_ids[:b], self.positions[:b])
                greedy = logits.argmax(-1)
            torch.cuda.synchronize()

        def replay():
            graph.replay()
            return logits, greedy

        return replay

    def run(self, step: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode-only step of n <= max_size sequences -> (logits [n, vocab], greedy tokens [n])."""
        n, b = self._load(step)
        logits, greedy = self.graphs[b]()
        return logits[:n], greedy[:n]

    def run_steps(self, step: StepInputs, steps: int) -> Iterator[list[int]]:
        """`steps` greedy decode steps from one step's inputs -> an iterator over their tokens (per
        step, one per real row).

        Between two replays each real row's next inputs are made on the GPU: the token just chosen,
        its position one further, the slot of that position in the row's block table (blocks for
        every step are allocated beforehand), one more token of context. Every replay is enqueued
        before the first step's tokens are yielded, and each step's tokens are yielded as soon as
        that step is done: the host takes them (stop checks, detokenizing, streaming) while the GPU
        runs the steps after, and only the last step's taking leaves the GPU waiting (unless
        `more_steps` continues the run before it). Padding rows keep their scratch slot."""
        n, b = self._load(step)
        return self._replays(n, b, steps, advance_first=False)

    def more_steps(self, block_tables: torch.Tensor, steps: int) -> Iterator[list[int]]:
        """`steps` more steps of the run last enqueued by run_steps / more_steps, from the inputs its
        last step leaves on the GPU (enqueued behind it: the GPU goes on without waiting for the
        host); `block_tables`: the rows' tables, grown for these steps."""
        n, b = self._last_run
        # from pinned memory: a copy from pageable memory may first wait for the stream (CUDA runtime
        # API, "API synchronization behavior"), i.e. for the run's last step, the wait this avoids
        pinned = block_tables.pin_memory() if self.block_tables.is_cuda else block_tables
        self.block_tables[:n].copy_(pinned, non_blocking=True)
        return self._replays(n, b, steps, advance_first=True)

    def _replays(self, n: int, b: int, steps: int, advance_first: bool) -> Iterator[list[int]]:
        replay = self.graphs[b]
        on_gpu = self.input_ids.is_cuda
        host = torch.empty(steps, n, dtype=torch.int64, pin_memory=on_gpu)
        done = []  # per step: its tokens' copy to `host`, finished when this event is
        greedy = self._last_greedy if advance_first else None
        for i in range(steps):
            if greedy is not None:
                self._advance(n, greedy)
            _, greedy = replay()
            host[i].copy_(greedy[:n], non_blocking=on_gpu)
            if on_gpu:
                done.append(torch.cuda.Event())
                done[-1].record()
        self._last_run, self._last_greedy = (n, b), greedy
        return self._tokens_when_ready(host, done)

    def _advance(self, n: int, greedy: torch.Tensor) -> None:
        """The next decode step's inputs of rows [:n], on the GPU, from the tokens just chosen."""
        bs = self.cache.block_size
        ids, pos, slots, ctx = self.input_ids[:n], self.positions[:n], self.slot_mapping[:n], self.context_lens[:n]
        ids.copy_(greedy[:n])
        pos.add_(1)
        ctx.add_(1)
        block = self.block_tables[:n].gather(1, torch.div(pos, bs, rounding_mode="floor")[:, None])[:, 0]
        slots.copy_(block.long() * bs + pos % bs)

    @staticmethod
    def _tokens_when_ready(host: torch.Tensor, done: list) -> Iterator[list[int]]:
        for i in range(host.shape[0]):
            if done:
                done[i].synchronize()
            yield host[i].tolist()

    def _load(self, step: StepInputs) -> tuple[int, int]:
        """Copies a step's inputs into the static buffers -> (its rows n, the graph's batch size b)."""
        n = len(step.input_ids)
        b = next(s for s in self.sizes if s >= n)
        pad = b - n
        # every row is rewritten: a padding row must not keep a real slot from an earlier step
        self.input_ids[:b].copy_(torch.tensor(step.input_ids + [0] * pad), non_blocking=True)
        self.positions[:b].copy_(torch.tensor(step.positions + [0] * pad), non_blocking=True)
        self.slot_mapping[:b].copy_(torch.tensor(step.slot_mapping + [self.scratch_slot] * pad), non_blocking=True)
        self.context_lens[:b].copy_(torch.tensor(step.context_lens + [1] * pad, dtype=torch.int32), non_blocking=True)
        self.block_tables[:n].copy_(step.block_tables, non_blocking=True)
        self.block_tables[n:b].fill_(self.scratch_block)
        return n, b
