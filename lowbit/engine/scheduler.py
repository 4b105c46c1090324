"""Decides, every step, which sequences run and how many tokens each computes. Never touches
tensors: it moves sequences between the waiting queue and the running list and asks the block
manager for room.

A step holds every running sequence's next token (decode), chunks of unfinished prompts, and new
requests, within `max_num_batched_tokens` and `max_batch_size`; decodes are taken first, so a
long prompt is spread over several steps instead of stalling everyone else (chunked prefill,
Sarathi-Serve). When the blocks run out, the newest sequence gives its blocks back and waits at
the front of the queue to recompute them later (preemption by recompute).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from lowbit.engine.block_manager import BlockManager
from lowbit.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)  # tokens each computes this step
    preempted: list[Sequence] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_batch_size: int, max_num_batched_tokens: int,
                 max_model_len: int):
        self.block_manager = block_manager
        self.max_batch_size = max_batch_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is the newest
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        chosen: dict[Sequence, int] = {}  # insertion-ordered: the batch's order
        preempted: list[Sequence] = []

        # Running sequences, oldest first: those decoding, then those still in their prompt.
        for decoding in (True, False):
            for seq in list(self.running):
                if seq.status != SequenceStatus.RUNNING or (seq.num_uncomputed_tokens == 1) != decoding:
                    continue
                n = min(seq.num_uncomputed_tokens, budget)
                if n == 0:
                    break
                while not bm.can_allocate(seq, n):
                    victim = self.running[-1]  # the newest; maybe seq itself
                    budget += chosen.pop(victim, 0)
                    self._preempt(victim)
                    preempted.append(victim)
                    if victim is seq:
                        break
                if seq.status == SequenceStatus.RUNNING:
                    bm.allocate(seq, n)
                    chosen[seq] = n
                    budget -= n

        # New and preempted requests, first come first served, unless this step had to preempt.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            prefix = bm.cached_prefix(seq)
            n = min(seq.num_tokens - len(prefix) * bm.block_size, budget)
            if not bm.can_allocate(seq, n, prefix):
                break
            self.waiting.popleft()
            bm.claim_prefix(seq, prefix)
            bm.allocate(seq, n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chosen[seq] = n
            budget -= n
        return ScheduledBatch(list(chosen), list(chosen.values()), preempted)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(seq)
        # pushed in newest-first order, so the oldest victim ends up first in line
        self.waiting.appendleft(seq)

    def update(self, batch: ScheduledBatch, sampled: list[int | None]) -> list[Sequence]:
        """Records a finished step: advances each sequence's computed tokens, appends the token
        sampled for it (None while its prompt is still being read), and finishes sequences that
        hit a stop token, max_tokens or max_model_len. Returns the sequences that got a token."""
        grown = []
        for seq, n, token in zip(batch.seqs, batch.num_new_tokens, sampled):
            if seq.status != SequenceStatus.RUNNING:
                continue
            before = seq.num_computed_tokens
            seq.num_computed_tokens += n
            self.block_manager.commit(seq, before)
            if token is None:
                continue
            grown.append(seq)
            if token in seq.stop_token_ids:
                self.finish(seq, "stop")
                continue
            seq.token_ids.append(token)
            if seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len:
                self.finish(seq, "length")
        return grown

    def finish(self, seq: Sequence, reason: str) -> None:
        """Ends a sequence wherever it is (running, waiting, or already finished: then a no-op)."""
        if seq.status == SequenceStatus.FINISHED:
            return
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
