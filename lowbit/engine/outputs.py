"""What a request gets back, and the per-request state behind it in the engine."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from lowbit.engine.detokenizer import Detokenizer
from lowbit.engine.sequence import Sequence, SequenceStatus
from lowbit.errors import LowbitError


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str = ""  # everything generated so far, cut before a stop string
    token_ids: list[int] = field(default_factory=list)  # the same, as ids (no stop token id)
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    delta_text: str = ""  # new since this request's previous output (what a stream sends)
    delta_token_ids: list[int] = field(default_factory=list)
    # per generated token: [(sampled id, logprob), (top-1 id, logprob), ...]; None unless asked
    logprobs: list[list[tuple[int, float]]] | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: LowbitError | None = None  # set when the request failed (finish_reason "error")


class RequestState:
    """One request in the engine: its sequence, where its outputs go, and (with detokenize) its
    text. Without detokenize the outputs carry token ids only and whoever listens makes the text
    (the async engine, on its event loop)."""

    def __init__(self, seq: Sequence, prompt: str | None, tokenizer, sink: Callable[[RequestOutput], None] | None,
                 detokenize: bool = True):
        self.seq, self.prompt, self.sink = seq, prompt, sink
        self.num_tokens_seen = 0  # output tokens taken in so far
        self.num_tokens_sent = 0
        self.logprobs = [] if seq.params.logprobs is not None else None
        self.error: LowbitError | None = None
        prompt_ids = seq.token_ids[:seq.num_prompt_tokens]
        self.detokenizer = Detokenizer(tokenizer, seq.params, prompt_ids) if detokenize else None

    def on_new_tokens(self) -> bool:
        """Takes in the tokens appended since the last call; True when a stop string ended the text."""
        new = self.seq.output_token_ids[self.num_tokens_seen:]
        self.num_tokens_seen += len(new)
        return self.detokenizer is not None and self.detokenizer.add(new) is not None

    def reject(self, error: LowbitError) -> RequestOutput:
        """The final output of a request that never ran."""
        self.error = error
        self.seq.status, self.seq.finish_reason = SequenceStatus.FINISHED, "error"
        return self.output()

    def output(self) -> RequestOutput:
        """The request's state now, with what is new since the previous output as the delta."""
        seq = self.seq
        finished = seq.is_finished
        ids = seq.output_token_ids
        text, delta = self.detokenizer.take(finished) if self.detokenizer is not None else ("", "")
        out = RequestOutput(
            request_id=seq.request_id, prompt=self.prompt, prompt_token_ids=seq.token_ids[:seq.num_prompt_tokens],
            text=text, token_ids=list(ids), finished=finished, finish_reason=seq.finish_reason,
            delta_text=delta, delta_token_ids=ids[self.num_tokens_sent:],
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            num_cached_tokens=seq.num_cached_tokens, error=self.error)
        self.num_tokens_sent = len(ids)
        return out
