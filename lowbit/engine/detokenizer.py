"""One request's text as its tokens arrive: incremental detokenization and stop strings. The one
detokenizer of every path: `LLM.generate` runs it inside the engine step; the async engine runs
it on the caller's event loop, off the engine's thread, so the model never waits on text."""
from __future__ import annotations

# Prompt tokens decoded ahead of the output, so the first output token keeps its leading space
# (SentencePiece drops it when a "▁word" token is decoded alone); vLLM uses the same window.
DETOKENIZE_CONTEXT = 6


class Detokenizer:
    """Decodes only a few tokens per new token (the offsets window of vLLM's detokenizer),
    holding back an incomplete UTF-8 character; finds stop strings in the new text."""

    def __init__(self, tokenizer, params, prompt_ids: list[int]):
        self.tokenizer, self.params = tokenizer, params
        self.text = ""
        self.num_tokens = 0  # output tokens turned into text so far
        self.num_chars_sent = 0
        self._ids = list(prompt_ids[-DETOKENIZE_CONTEXT:])
        self._prefix, self._read = 0, len(self._ids)

    def _next_piece(self) -> str:
        skip = self.params.skip_special_tokens
        before = self.tokenizer.decode(self._ids[self._prefix:self._read], skip_special_tokens=skip)
        now = self.tokenizer.decode(self._ids[self._prefix:], skip_special_tokens=skip)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return now[len(before):]
        return ""

    def add(self, token_ids: list[int]) -> int | None:
        """Adds the text of new tokens. When a stop string ends the text, the number of these
        tokens it took (the rest come after the stop and are not part of the answer); else None."""
        stops = self.params.stop
        for i, token in enumerate(token_ids):
            self.num_tokens += 1
            self._ids.append(token)
            old_len = len(self.text)
            self.text += self._next_piece()
            if stops and self._cut_at_stop(old_len):
                return i + 1
        return None

    def _cut_at_stop(self, old_len: int) -> bool:
        hits = []
        for s in self.params.stop:
            # a stop string can end only in the new text, so it starts no earlier than this
            i = self.text.find(s, max(0, old_len - len(s) + 1))
            if i >= 0:
                hits.append((i, s))
        if not hits:
            return False
        i, s = min(hits)
        self.text = self.text[:i + (len(s) if self.params.include_stop_str_in_output else 0)]
        return True

    def take(self, finished: bool) -> tuple[str, str]:
        """(the text that may be shown now, what of it is new since the last take)."""
        visible = len(self.text)
        if not finished and self.params.stop:
            # the text's tail may be the start of a stop string: send it once that is settled
            visible = max(self.num_chars_sent, visible - (max(len(s) for s in self.params.stop) - 1))
        delta = self.text[self.num_chars_sent:visible]
        self.num_chars_sent = visible
        return self.text[:visible], delta
