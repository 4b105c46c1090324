"""`lowbit generate`: one prompt through the engine, its answer streamed as the tokens come.

The engine is sized for this one request: one sequence of prompt + max_new_tokens tokens in the
KV cache, instead of the model's whole context (8192 tokens for SmolLM2) and, on the CPU, the
512 MiB a server reserves."""
from __future__ import annotations

from lowbit.engine.llm import LLM
from lowbit.errors import LowbitError

BLOCK_SIZE = 16  # tokens per KV block, the engine's default


def prompt_ids(tokenizer, prompt: str, system: str | None = None, raw: bool = False) -> list[int]:
    """The user message through the model's chat template (with an optional system message), or
    as is with raw."""
    if raw:
        return tokenizer.encode(prompt)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.encode_chat(messages)


def engine_for_one(loaded: tuple, num_prompt_tokens: int, max_new_tokens: int, tp: int = 1) -> LLM:
    """An engine over `load_model`'s (model, tokenizer, checkpoint) that holds exactly one sequence
    of the prompt and its answer; the answer stops early at the model's context."""
    context = loaded[0].config.max_position_embeddings
    if num_prompt_tokens >= context:
        raise LowbitError(f"prompt has {num_prompt_tokens} tokens; the model's context is {context}: shorten it")
    max_len = min(num_prompt_tokens + max_new_tokens, context)
    return LLM(loaded, max_batch_size=1, max_model_len=max_len, block_size=BLOCK_SIZE,
               num_kv_blocks=-(-max_len // BLOCK_SIZE), enable_prefix_caching=False, tensor_parallel_size=tp)


def load_for_one(model: str, prompt: str, max_new_tokens: int, system: str | None = None, raw: bool = False,
                 dtype: str = "auto", device: str | None = None, tp: int = 1) -> tuple[LLM, list[int]]:
    """Loads MODEL -> (an engine for this one prompt, the prompt's token ids); run it with
    `llm.iter_outputs(ids, params)`."""
    from lowbit.loading.loader import load_model
    from lowbit.models.default import resolve_model

    loaded = load_model(resolve_model(model), dtype, device)
    ids = prompt_ids(loaded[1], prompt, system, raw)
    return engine_for_one(loaded, len(ids), max_new_tokens, tp), ids
