"""The batched engine (paged KV cache, continuous batching) and its API; `generator` keeps the
simple single-sequence path."""
from lowbit.engine.llm import LLM
from lowbit.engine.outputs import RequestOutput
from lowbit.engine.sampling_params import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
