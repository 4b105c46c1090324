"""What every checkpoint reader gives the loader: a config, tensors by HF Llama name, a tokenizer."""
from __future__ import annotations

from typing import Iterable

import torch

from lowbit.config import ModelConfig


class Checkpoint:
    config: ModelConfig
    quant: dict | None = None  # `quantization_config` from config.json, None for dense weights
    source: str = ""

    def names(self) -> Iterable[str]:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        """The tensor stored under `name` (HF Llama naming), read on demand."""
        raise NotImplementedError

    def has(self, name: str) -> bool:
        return name in set(self.names())

    def tokenizer(self):
        raise NotImplementedError

    def generation_config(self) -> dict:
        return {}
