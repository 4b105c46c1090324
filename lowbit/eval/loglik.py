"""Log-likelihood of a continuation given a context, batched through the model's forward, the way
lm-evaluation-harness's HFLM computes it (`_encode_pair`, `_loglikelihood_tokens`):

- context and continuation are split as strings first (trailing spaces of the context move to the
  continuation); the continuation's tokens are those of tokenize(context + continuation) past
  len(tokenize(context)), and the model reads tokenize(context) + those tokens, so a BPE merge
  across the boundary is scored as the harness scores it;
- no BOS is added (the harness's default for causal models); an empty context becomes [BOS];
- the input is (context + continuation)[:-1] cut from the left to the model's length, and the
  score is the summed log-probability of the continuation tokens at the last positions;
- requests whose inputs are identical share one forward (the harness's logits cache), which makes
  MMLU's four one-token answers one forward per question.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Request:
    context_ids: list[int]
    continuation_ids: list[int]


def encode_pair(tokenizer, context: str, continuation: str, prefix_id: int | None = None) -> Request:
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        if prefix_id is None:
            raise ValueError("empty context needs a prefix token id (BOS)")
        return Request([prefix_id], tokenizer.encode(continuation, add_special_tokens=False))
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    ctx = tokenizer.encode(context, add_special_tokens=False)
    return Request(ctx, whole[len(ctx):])


@torch.no_grad()
def loglikelihoods(model, requests: list[Request], batch_size: int = 4, max_length: int | None = None,
                   device=None, progress=None, kv_bits: int = 16) -> list[float]:
    """Summed log P(continuation | context) (nats, float64) for each request, in order. kv_bits 8 / 4:
    each sequence attends through a quantized paged KV cache (eval/kv_forward.py), one at a time."""
    from lowbit.eval.kv_forward import kv_cache_logits

    device = device or next(model.parameters()).device
    if kv_bits != 16:
        batch_size = 1  # one sequence per cache: no padding inside it
    max_length = max_length or 2048
    # unique model inputs -> the requests that read their logits
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, r in enumerate(requests):
        if not r.continuation_ids:
            raise ValueError(f"request {i}: empty continuation")
        seq = (r.context_ids + r.continuation_ids)[-(max_length + 1):]
        groups.setdefault(tuple(seq[:-1]), []).append(i)
    inputs = sorted(groups, key=len, reverse=True)  # longest first: similar lengths share a batch
    out = [0.0] * len(requests)
    for s in range(0, len(inputs), batch_size):
        batch = inputs[s:s + batch_size]
        longest = len(batch[0])
        # right padding: with causal attention the pad after a sequence never reaches its positions
        x = torch.zeros(len(batch), longest, dtype=torch.long)  # [b, T]
        for j, seq in enumerate(batch):
            x[j, :len(seq)] = torch.tensor(seq)
        x = x.to(device)
        logits = model(x) if kv_bits == 16 else kv_cache_logits(model, x, kv_bits)  # [b, T, vocab]
        for j, seq in enumerate(batch):
            for i in groups[seq]:
                cont = requests[i].continuation_ids
                n = len(cont)
                logp = torch.log_softmax(logits[j, len(seq) - n:len(seq)].double(), dim=-1)  # [n, vocab]
                target = torch.tensor(cont, device=logp.device)
                out[i] = float(logp.gather(1, target[:, None]).sum())
        del logits
        if progress is not None:
            progress(sum(len(groups[seq]) for seq in batch))
    return out
