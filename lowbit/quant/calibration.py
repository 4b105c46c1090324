"""Calibration windows: `n_samples` token windows of `seqlen` tokens from a corpus's calib split.

The corpus is tokenized as one stream, cut into non-overlapping windows, and `n_samples` of them
are drawn without replacement by a seeded generator: the same seed gives the same windows on any
machine, and no token is seen twice. The calib role of `lowbit.eval.datasets` never touches the
test split that perplexity is measured on.
"""
from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.eval.datasets import load_text, resolve

# AWQ / LMDeploy defaults (LMDeploy `lite auto_awq`: 128 samples of 2048 tokens); our default corpus
# is WikiText-2's validation split, since pileval is not shipped.
DEFAULT_DATASET = "wikitext2"
DEFAULT_SAMPLES = 128
DEFAULT_SEQLEN = 2048


def calibration_tokens(tokenizer, dataset: str = DEFAULT_DATASET) -> list[int]:
    return tokenizer.encode(load_text(dataset, role="calib"), add_special_tokens=False)


def sample_windows(token_ids: list[int] | torch.Tensor, n_samples: int, seqlen: int, seed: int = 0,
                   source: str = "calibration corpus") -> torch.Tensor:
    """int64 [n_samples, seqlen]: distinct non-overlapping windows of the stream, drawn by `seed`."""
    if n_samples < 1 or seqlen < 1:
        raise LowbitError(f"--calib-samples {n_samples} / --calib-seqlen {seqlen}: both must be at least 1")
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    n_windows = ids.numel() // seqlen
    if n_windows < n_samples:
        raise LowbitError(f"{source}: {ids.numel()} tokens hold {n_windows} windows of {seqlen} tokens, but "
                          f"--calib-samples {n_samples} x --calib-seqlen {seqlen} = {n_samples * seqlen} tokens "
                          f"were requested; lower --calib-samples or --calib-seqlen, or pick a larger --calib-dataset")
    windows = ids[: n_windows * seqlen].view(n_windows, seqlen)
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(n_windows, generator=gen)[:n_samples].sort().values
    return windows[pick].clone()


def calibration_set(tokenizer, dataset: str = DEFAULT_DATASET, n_samples: int = DEFAULT_SAMPLES,
                    seqlen: int = DEFAULT_SEQLEN, seed: int = 0) -> torch.Tensor:
    """int64 [n_samples, seqlen] token windows of `dataset`'s calibration split."""
    source = f"--calib-dataset {dataset} ({resolve(dataset, 'calib').describe()})"
    return sample_windows(calibration_tokens(tokenizer, dataset), n_samples, seqlen, seed, source)
