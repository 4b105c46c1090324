"""What a request gets back, and the per-request text state behind it: incremental
detokenization and stop strings."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from lowbit.engine.sequence import Sequence, SequenceStatus
from lowbit.errors import LowbitError

# Prompt tokens decoded ahead of the output, so the first output token keeps its leading space
# (SentencePiece drops it when a "▁word" token is decoded alone); vLLM uses the same window.
DETOKENIZE_CONTEXT = 6


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
    """One request's text as its tokens arrive. Decodes only a few tokens per step (the
    offsets window of vLLM's detokenizer), holding back an incomplete UTF-8 character."""

    def __init__(self, seq: Sequence, prompt: str | None, tokenizer, sink: Callable[[RequestOutput], None] | None):
        self.seq, self.prompt, self.tokenizer, self.sink = seq, prompt, tokenizer, sink
        self.text = ""
        self.num_tokens_seen = 0  # output tokens turned into text so far
        self.num_tokens_sent, self.num_chars_sent = 0, 0
        self.logprobs = [] if seq.params.logprobs is not None else None
        self.error: LowbitError | None = None
        context = seq.token_ids[max(0, seq.num_prompt_tokens - DETOKENIZE_CONTEXT):seq.num_prompt_tokens]
        self._ids = list(context)
        self._prefix, self._read = 0, len(context)

    def _next_piece(self) -> str:
        skip = self.seq.params.skip_special_tokens
        before = self.tokenizer.decode(self._ids[self._prefix:self._read], skip_special_tokens=skip)
        now = self.tokenizer.decode(self._ids[self._prefix:], skip_special_tokens=skip)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return now[len(before):]
        return ""

    def on_new_tokens(self) -> bool:
        """Adds the text of tokens appended since the last call; True when a stop string ended it."""
        params = self.seq.params
        for token in self.seq.output_token_ids[self.num_tokens_seen:]:
            self.num_tokens_seen += 1
            self._ids.append(token)
            old_len = len(self.text)
            self.text += self._next_piece()
            if params.stop and self._cut_at_stop(old_len):
                return True
        return False

    def _cut_at_stop(self, old_len: int) -> bool:
        hits = []
        for s in self.seq.params.stop:
            # a stop string can end only in the new text, so it starts no earlier than this
            i = self.text.find(s, max(0, old_len - len(s) + 1))
            if i >= 0:
                hits.append((i, s))
        if not hits:
            return False
        i, s = min(hits)
        self.text = self.text[:i + (len(s) if self.seq.params.include_stop_str_in_output else 0)]
        return True

    def reject(self, error: LowbitError) -> RequestOutput:
        """The final output of a request that never ran."""
        self.error = error
        self.seq.status, self.seq.finish_reason = SequenceStatus.FINISHED, "error"
        return self.output()

    def output(self) -> RequestOutput:
        """The request's state now, with what is new since the previous output as the delta."""
        seq = self.seq
        finished = seq.is_finished
        visible = len(self.text)
        if not finished and seq.params.stop:
            # the text's tail may be the start of a stop string: send it once that is settled
            visible = max(self.num_chars_sent, visible - (max(len(s) for s in seq.params.stop) - 1))
        ids = seq.output_token_ids
        out = RequestOutput(
            request_id=seq.request_id, prompt=self.prompt, prompt_token_ids=seq.token_ids[:seq.num_prompt_tokens],
            text=self.text[:visible], token_ids=list(ids), finished=finished, finish_reason=seq.finish_reason,
            delta_text=self.text[self.num_chars_sent:visible], delta_token_ids=ids[self.num_tokens_sent:],
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            num_cached_tokens=seq.num_cached_tokens, error=self.error)
        self.num_chars_sent, self.num_tokens_sent = visible, len(ids)
        return out
