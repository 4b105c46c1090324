"""Single-sequence streaming generation over a contiguous KV cache: what `generate` and `chat`
run until the batched engine takes over."""
from __future__ import annotations

from typing import Iterator

import torch

from lowbit.layers.kv_cache import ContiguousKVCache
from lowbit.layers.sampler import SamplingOptions, sample
from lowbit.errors import LowbitError


class StreamDecoder:
    """Turns token ids into text pieces as they arrive, holding back split UTF-8 characters."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece


@torch.inference_mode()
def generate_ids(model, prompt_ids: list[int], max_new_tokens: int, opts: SamplingOptions,
                 stop_ids: set[int]) -> Iterator[int]:
    """Yields new token ids one by one; stops after a stop id (not yielded) or max_new_tokens."""
    cfg = model.config
    device = model.model.embed_tokens.weight.device
    total = len(prompt_ids) + max_new_tokens
    if len(prompt_ids) == 0:
        raise LowbitError("empty prompt")
    if len(prompt_ids) >= cfg.max_position_embeddings:
        raise LowbitError(f"prompt has {len(prompt_ids)} tokens; the model's context is {cfg.max_position_embeddings}")
    total = min(total, cfg.max_position_embeddings)
    cache = ContiguousKVCache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, total, cfg.head_dim,
                              model.model.embed_tokens.weight.dtype, device)
    gen = None
    if opts.seed is not None:
        gen = torch.Generator(device=device).manual_seed(opts.seed)
    x = torch.tensor([prompt_ids], device=device)
    for _ in range(total - len(prompt_ids)):
        logits = model(x, cache=cache, last_only=True)[:, -1]
        nxt = int(sample(logits, opts, gen)[0])
        if nxt in stop_ids:
            return
        yield nxt
        x = torch.tensor([[nxt]], device=device)


def stream_text(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, opts: SamplingOptions,
                stop_ids: set[int]) -> Iterator[str]:
    dec = StreamDecoder(tokenizer)
    for tid in generate_ids(model, prompt_ids, max_new_tokens, opts, stop_ids):
        piece = dec.push(tid)
        if piece:
            yield piece
