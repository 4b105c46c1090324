"""Structured output: a request's text held to a JSON schema, any JSON object, a regular expression
or one of a list of strings (OpenAI's `response_format`, vLLM's guided decoding).

Before each sampling step the grammar's matcher says which tokens may come next (a bitmask over
the vocabulary); the others get -inf logits, so greedy and random sampling alike can only pick an
allowed token; the sampled token then advances the matcher. The grammar engine is llguidance
(guidance-ai's Rust library, also under vLLM's and llama.cpp's structured output): it computes
each mask lazily from the tokenizer's token bytes, with no index built over the vocabulary per
schema, and JSON whitespace compact (no run-away spaces). It is imported on first use only.
"""
from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lowbit.errors import LowbitError

if TYPE_CHECKING:  # torch is imported where masks are made: SamplingParams imports this module
    import torch


@dataclass(frozen=True)
class StructuredOutput:
    """What the output must match: exactly one of the fields."""

    json_schema: dict | None = None  # a JSON Schema (draft 2020-12 subset; OpenAI's json_schema)
    json_object: bool = False  # any JSON object (OpenAI's json_object)
    regex: str | None = None  # the whole output matches this regular expression
    choice: tuple[str, ...] | None = None  # the output is one of these strings

    def __post_init__(self):
        given = [self.json_schema is not None, self.json_object, self.regex is not None, self.choice is not None]
        if sum(given) != 1:
            raise LowbitError("structured output: give exactly one of json_schema, json_object, regex, choice")
        if self.json_schema is not None and not isinstance(self.json_schema, dict):
            raise LowbitError("structured output: json_schema must be a JSON object, not "
                              f"{type(self.json_schema).__name__}")
        if self.choice is not None:
            strings = not isinstance(self.choice, str) and all(isinstance(c, str) and c for c in self.choice)
            if not strings or not self.choice:
                raise LowbitError("structured output: choice must be a non-empty list of non-empty strings")
            object.__setattr__(self, "choice", tuple(self.choice))

    def grammar(self) -> str:
        """-> the llguidance grammar (its JSON form); LowbitError where the schema or regex is bad."""
        import llguidance

        compact = {"whitespace_flexible": False}
        try:
            if self.json_schema is not None:
                return llguidance.LLMatcher.grammar_from_json_schema(self.json_schema, defaults=compact)
            if self.json_object:
                return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=compact)
            if self.regex is not None:
                return llguidance.LLMatcher.grammar_from_regex(self.regex)
            return llguidance.LLMatcher.grammar_from_regex("|".join(re.escape(c) for c in self.choice))
        except Exception as e:  # llguidance raises ValueError with its parser's message
            raise LowbitError(f"structured output: {self.describe()} is not usable: {e}") from None

    def describe(self) -> str:
        if self.json_schema is not None:
            return f"JSON schema {json.dumps(self.json_schema)[:200]}"
        if self.json_object:
            return "JSON object"
        return f"regex {self.regex!r}" if self.regex is not None else f"choice {list(self.choice)!r}"


class Matcher:
    """One request's place in its grammar."""

    def __init__(self, matcher):
        self._m = matcher
        self.error: str | None = None  # set when a token did not fit: that request fails, not the step

    def consume(self, token: int) -> None:
        if self.error is None and not self._m.consume_token(token):
            self.error = f"structured output: token {token} does not fit the grammar: {self._m.get_error()}"

    @property
    def done(self) -> bool:
        """The grammar is complete and admits no further token (it stops the sequence)."""
        return self._m.is_stopped()


class GrammarCompiler:
    """Per engine: the tokenizer as llguidance sees it (built once, ~0.5 s) and matchers for
    requests. Thread-safe: requests are checked on the server's threads."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: set[int]):
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos = sorted(t for t in eos_token_ids if 0 <= t < vocab_size)
        self._lltok = None
        self._lock = threading.Lock()

    def _ll_tokenizer(self):
        with self._lock:
            if self._lltok is None:
                backend = getattr(self._tokenizer, "tok", None)  # loading/tokenizer.py's tokenizers.Tokenizer
                if backend is None or not hasattr(backend, "to_str"):
                    raise LowbitError("structured output needs the model's tokenizer (dummy weights have none)")
                if not self._eos:
                    raise LowbitError("structured output needs an end-of-sequence token; the tokenizer names none")
                import llguidance

                # the tokenizer's JSON as the tokenizers library writes it; n_vocab: the logits' width
                self._lltok = llguidance.LLTokenizer(backend.to_str(), n_vocab=self._vocab_size, eos_token=self._eos[0])
            return self._lltok

    def matcher(self, spec: StructuredOutput) -> Matcher:
        import llguidance

        m = llguidance.LLMatcher(self._ll_tokenizer(), spec.grammar())
        if m.is_error():
            raise LowbitError(f"structured output: {spec.describe()} is not usable: {m.get_error()}")
        return Matcher(m)


_EXECUTOR = None  # llguidance's thread pool: a batch's masks computed in parallel, off the GIL


def allowed_tokens_bitmask(matchers: list[Matcher | None], vocab_size: int) -> "torch.Tensor":
    """-> int32 [B, ceil(vocab / 32)] on the CPU (bit t % 32 of word t // 32: token t may come
    next): each matcher's allowed tokens, every token for None."""
    global _EXECUTOR
    import torch

    bitmask = torch.full((len(matchers), (vocab_size + 31) // 32), -1, dtype=torch.int32)
    rows = [(m._m, i) for i, m in enumerate(matchers) if m is not None]
    row_bytes = bitmask.shape[1] * 4
    if len(rows) == 1:
        m, i = rows[0]
        m.unsafe_compute_mask_ptr(bitmask[i].data_ptr(), row_bytes)
    elif rows:
        if _EXECUTOR is None:
            import llguidance

            _EXECUTOR = llguidance.LLExecutor()
        _EXECUTOR.unsafe_compute_mask_ptr(rows, bitmask.data_ptr(), row_bytes, len(matchers))
    return bitmask


def apply_bitmask(logits: "torch.Tensor", bitmask: "torch.Tensor") -> "torch.Tensor":
    """logits [B, V] with -inf where the bitmask's bit is 0 (new tensor, on the logits' device)."""
    import torch

    words = bitmask.to(logits.device, non_blocking=True)
    bits = (words[:, :, None] >> torch.arange(32, device=logits.device, dtype=torch.int32)) & 1
    allowed = bits.reshape(words.shape[0], -1)[:, :logits.shape[-1]].bool()
    return logits.masked_fill(~allowed, float("-inf"))
