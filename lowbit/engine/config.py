"""The engine's settings, with defaults filled in and checked against the model once."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lowbit.config import ModelConfig
from lowbit.errors import LowbitError

KV_BITS = (16, 8, 4)
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048  # vLLM's chunked-prefill default: long enough to keep a GPU busy
CPU_KV_CACHE_BYTES = 512 << 20  # the cache size on CPU when num_kv_blocks is not given


@dataclass
class EngineConfig:
    kv_bits: int = 16  # 16: the model's dtype; 8 / 4: quantized per token and head
    max_batch_size: int = 64  # sequences running at once
    max_model_len: int | None = None  # prompt + output tokens per sequence; default: the model's context
    gpu_memory_utilization: float = 0.9  # share of GPU memory for weights, activations and KV cache
    block_size: int = 16  # tokens per KV block
    max_num_batched_tokens: int | None = None  # tokens computed per step, over all sequences
    enable_prefix_caching: bool = True
    num_kv_blocks: int | None = None  # fixes the cache size instead of deriving it from memory
    enforce_eager: bool = False  # no CUDA graphs for decode (they are never used on the CPU)
    # decode steps run per host round trip (vLLM's name): the next step's inputs are made on the GPU
    # from the tokens just sampled, so the GPU does not wait for Python between them. None: 8 where
    # decode runs from CUDA graphs, else 1 (llm_engine.py, `steps_ahead`, says when it applies)
    num_scheduler_steps: int | None = None

    def resolved(self, model: ModelConfig) -> "EngineConfig":
        max_len = self.max_model_len or model.max_position_embeddings
        tokens = self.max_num_batched_tokens or max(DEFAULT_MAX_NUM_BATCHED_TOKENS, self.max_batch_size)
        checks = [
            (self.kv_bits in KV_BITS, f"kv_bits={self.kv_bits}: expected one of {KV_BITS}"),
            (self.max_batch_size >= 1, f"max_batch_size={self.max_batch_size}: must be at least 1"),
            (self.block_size >= 1, f"block_size={self.block_size}: must be at least 1"),
            (1 <= max_len <= model.max_position_embeddings,
             f"max_model_len={max_len}: the model's context is {model.max_position_embeddings} tokens; "
             "pick a length from 1 to that"),
            (tokens >= self.max_batch_size,
             f"max_num_batched_tokens={tokens} is below max_batch_size={self.max_batch_size}: "
             "every running sequence needs a token per step; raise it"),
            (0 < self.gpu_memory_utilization <= 1,
             f"gpu_memory_utilization={self.gpu_memory_utilization}: must be in (0, 1]"),
            (self.num_kv_blocks is None or self.num_kv_blocks >= 1, f"num_kv_blocks={self.num_kv_blocks}: must be >= 1"),
            (self.num_scheduler_steps is None or self.num_scheduler_steps >= 1,
             f"num_scheduler_steps={self.num_scheduler_steps}: must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise LowbitError(msg)
        return dataclasses.replace(self, max_model_len=max_len, max_num_batched_tokens=tokens)
