"""Text for a server on dummy weights (`lowbit serve --dummy-weights --arch NAME`): random weights
have no vocabulary, yet load tests send chat requests. Text in is its UTF-8 bytes, one token each
(every preset's vocabulary has at least 256 ids); tokens out are written as their ids, as the
bench's DummyTokenizer does, so each token is visible text and a stream sends a chunk per token."""
from __future__ import annotations

from lowbit.errors import LowbitError


class ByteChatTokenizer:
    eos_token_id = None

    def __init__(self, vocab_size: int):
        if vocab_size < 256:
            raise LowbitError(f"dummy weights with a vocabulary of {vocab_size} ids cannot take text (bytes need 256)")
        self.vocab_size = vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        # no template: tools are not shown (a forced call's grammar still needs a real tokenizer)
        return self.encode("".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: ")

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(f" {i}" for i in ids)

    def stop_token_ids(self, extra=None) -> set[int]:
        return set()  # no end-of-sequence token: every answer runs to max_tokens, as load tests want
