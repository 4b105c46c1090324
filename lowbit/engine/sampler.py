"""Next tokens for a whole batch at once, on the logits' device: penalties, temperature, min-p,
top-k, top-p, each row with its own settings, and per-request seeds.

Order as in vLLM: logit bias, penalties, then temperature, min-p against the top
probability, top-k, top-p over what top-k kept. Greedy rows take the argmax after penalties.
Drawing uses the exponential-race form of multinomial sampling (argmax of p / E with E ~ Exp(1)),
so a seeded row draws its noise from its own generator and its tokens do not depend on which
other requests share the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.engine.sequence import Sequence


@dataclass
class SamplingBatch:
    temperature: torch.Tensor  # [B] fp32; 0 marks a greedy row
    top_k: torch.Tensor  # [B] int64; vocab size where off
    top_p: torch.Tensor  # [B] fp32
    min_p: torch.Tensor  # [B] fp32
    generators: list[torch.Generator | None]  # [B]; None draws from the default generator
    num_logprobs: list[int | None]  # [B]
    # penalties, None when no row uses any
    repetition: torch.Tensor | None = None  # [B] fp32
    presence: torch.Tensor | None = None  # [B] fp32
    frequency: torch.Tensor | None = None  # [B] fp32
    prompt_mask: torch.Tensor | None = None  # [B, vocab] bool: token is in the prompt
    output_counts: torch.Tensor | None = None  # [B, vocab] fp32: times generated so far
    logit_bias: torch.Tensor | None = None  # [B, vocab] fp32, None when no row has one

    @classmethod
    def build(cls, seqs: list[Sequence], generators: list[torch.Generator | None], vocab_size: int,
              device: torch.device) -> "SamplingBatch":
        ps = [s.params for s in seqs]

        def col(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device)

        batch = cls(
            temperature=col([p.temperature for p in ps]),
            top_k=col([p.top_k if p.top_k > 0 else vocab_size for p in ps], torch.int64),
            top_p=col([p.top_p for p in ps]),
            min_p=col([p.min_p for p in ps]),
            generators=generators,
            num_logprobs=[p.logprobs for p in ps],
        )
        if any(p.logit_bias for p in ps):
            bias = torch.zeros(len(ps), vocab_size)
            for i, p in enumerate(ps):
                for t, v in p.logit_bias.items():
                    bias[i, t] = v
            batch.logit_bias = bias.to(device)
        if any(p.has_penalties for p in ps):
            batch.repetition = col([p.repetition_penalty for p in ps])
            batch.presence = col([p.presence_penalty for p in ps])
            batch.frequency = col([p.frequency_penalty for p in ps])
            batch.prompt_mask = token_counts([s.token_ids[:s.num_prompt_tokens] for s in seqs], vocab_size, device) > 0
            batch.output_counts = token_counts([s.output_token_ids for s in seqs], vocab_size, device)
        return batch


def token_counts(rows: list[list[int]], vocab_size: int, device) -> torch.Tensor:
    """[B, vocab] fp32: how often each token id occurs in each row."""
    width = max((len(r) for r in rows), default=0)
    # pad with an extra id `vocab_size`, counted in a column that is dropped
    ids = torch.full((len(rows), width), vocab_size, dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.int64)
    counts = torch.zeros(len(rows), vocab_size + 1, device=device)
    counts.scatter_add_(1, ids.to(device), torch.ones(ids.shape, device=device))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    seen = b.prompt_mask | (b.output_counts > 0)
    rep = b.repetition[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - b.frequency[:, None] * b.output_counts - b.presence[:, None] * (b.output_counts > 0)


def truncate(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Sets to -inf what min-p, top-k and top-p drop, row by row (logits already tempered)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    drop = (rank >= b.top_k[:, None]) | (probs < b.min_p[:, None] * probs[:, :1])
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    # top-p over what is left: drop a token once the mass before it reaches top_p (the first stays)
    probs = sorted_logits.softmax(-1)
    drop = (probs.cumsum(-1) - probs) >= b.top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def exponential_noise(shape, generators: list[torch.Generator | None], device) -> torch.Tensor:
    noise = torch.empty(shape, device=device).exponential_()
    for i, g in enumerate(generators):
        if g is not None:
            noise[i].exponential_(generator=g)
    return noise


def sample(logits: torch.Tensor, b: SamplingBatch) -> tuple[torch.Tensor, list | None]:
    """logits [B, vocab] fp32 -> (token ids [B], per row None or [(token, logprob), ...] with the
    sampled token first, then the top alternatives; logprobs are the model's, before penalties)."""
    raw = logits
    if b.logit_bias is not None:  # first, as vLLM's logit-bias processor runs before penalties
        logits = logits + b.logit_bias
    if b.repetition is not None:
        logits = apply_penalties(logits, b)
    tokens = logits.argmax(-1)
    random_rows = b.temperature > 0
    if bool(random_rows.any()):
        tempered = logits / torch.where(random_rows, b.temperature, 1.0)[:, None]
        probs = truncate(tempered, b).softmax(-1)
        drawn = (probs / exponential_noise(probs.shape, b.generators, probs.device)).argmax(-1)
        tokens = torch.where(random_rows, drawn, tokens)
    return tokens, logprobs_of(raw, tokens, b.num_logprobs)


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, wanted: list[int | None]) -> list | None:
    if all(n is None for n in wanted):
        return None
    logp = logits.log_softmax(-1)
    k = max(n or 0 for n in wanted)
    top_val, top_idx = logp.topk(k, dim=-1)
    chosen = logp.gather(1, tokens[:, None])[:, 0]
    out = []
    for i, n in enumerate(wanted):
        if n is None:
            out.append(None)
            continue
        pairs = [(int(tokens[i]), float(chosen[i]))]
        # tokens masked out (structured output) have no probability: not alternatives
        pairs += [(int(t), float(v)) for t, v in zip(top_idx[i, :n].tolist(), top_val[i, :n].tolist())
                  if v != float("-inf")]
        out.append(pairs)
    return out
