"""Next-token choice from logits: greedy, or temperature / top-k / top-p sampling."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingOptions:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0
    seed: int | None = None


def sample(logits: torch.Tensor, opts: SamplingOptions, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, vocab] -> token ids [B]."""
    if opts.temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / opts.temperature
    if opts.top_k > 0:
        kth = torch.topk(logits, min(opts.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if opts.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token once the mass before it already reaches top_p (the first token always stays)
        drop = (cum - sorted_logits.softmax(-1)) >= opts.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
