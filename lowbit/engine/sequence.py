"""One request's tokens and progress: plain data that the scheduler, block manager and model
runner share. No tensors live here."""
from __future__ import annotations

import enum
import itertools

from lowbit.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # new, or preempted and waiting to recompute its cache
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    _ids = itertools.count()

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 stop_token_ids: set[int] = frozenset()):
        self.seq_id = next(Sequence._ids)
        self.request_id = request_id
        self.params = params
        self.stop_token_ids = frozenset(stop_token_ids)  # sampling one ends the sequence, unappended
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        # Tokens whose K/V are in the cache. The newest token is never computed until the next
        # step feeds it, so a running sequence always has at least one token left to compute.
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at admission
        self.block_table: list[int] = []  # block ids in order; the block manager fills it
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None  # "stop", "length", "abort" or "error"
        self.num_preemptions = 0
        # where the output stands in its grammar (structured_output.Matcher), for requests that
        # constrain their output; the model runner masks and advances it
        self.grammar = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
                f"blocks={len(self.block_table)}, {self.status.value})")
