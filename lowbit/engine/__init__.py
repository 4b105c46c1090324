"""The batched engine (paged KV cache, continuous batching) and its API: the one path every
command that generates text runs on."""
from lowbit.engine.llm import LLM
from lowbit.engine.outputs import RequestOutput
from lowbit.engine.sampling_params import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
