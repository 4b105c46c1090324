"""`LLM`: the offline API in vLLM's shape. `generate` and `chat` run a batch to completion;
`stream` yields deltas as they come, through the async engine the server uses; `iter_outputs` does
the same for plain (non-async) code, stepping the engine in the caller's thread."""
from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import AsyncIterator, Iterator, Sequence as Seq

from lowbit.engine.config import EngineConfig
from lowbit.engine.llm_engine import LLMEngine, Prompt
from lowbit.engine.outputs import RequestOutput
from lowbit.engine.sampling_params import SamplingParams
from lowbit.errors import LowbitError


class LLM:
    def __init__(self, model: str | Path | tuple = "default", kv_bits: int = 16, max_batch_size: int = 64,
                 max_model_len: int | None = None, gpu_memory_utilization: float = 0.9, block_size: int = 16,
                 max_num_batched_tokens: int | None = None, enable_prefix_caching: bool = True,
                 num_kv_blocks: int | None = None, dtype: str = "auto", device: str | None = None,
                 enforce_eager: bool = False):
        """model: `default`, a .gguf file or an HF / quantized directory; or the (model, tokenizer,
        checkpoint) triple that `load_model` returns, to share weights already loaded.
        enforce_eager: decode without CUDA graphs (on a GPU they are captured at start-up)."""
        if isinstance(model, tuple):
            net, tokenizer, ckpt = model
        else:
            from lowbit.loading.loader import load_model
            from lowbit.models.default import resolve_model

            net, tokenizer, ckpt = load_model(resolve_model(str(model)), dtype, device)
        config = EngineConfig(kv_bits, max_batch_size, max_model_len, gpu_memory_utilization, block_size,
                              max_num_batched_tokens, enable_prefix_caching, num_kv_blocks, enforce_eager)
        eos = tokenizer.stop_token_ids(ckpt.generation_config().get("eos_token_id"))
        self.tokenizer = tokenizer
        self.engine = LLMEngine(net, tokenizer, config, eos)
        self._async = None

    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    def generate(self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """One output per prompt, in order. A prompt that cannot run (too long, empty, bad ids)
        gets an output with finish_reason "error" and its LowbitError; the others still run."""
        single = isinstance(prompts, str) or (isinstance(prompts, list) and all(isinstance(t, int) for t in prompts)
                                              and len(prompts) > 0)
        prompts = [prompts] if single else list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise LowbitError(f"{len(params)} SamplingParams for {len(prompts)} prompts: give one, or one per prompt")
        finals: dict[str, RequestOutput] = {}

        def keep_final(out: RequestOutput) -> None:
            if out.finished:
                finals[out.request_id] = out

        ids = [self.engine.new_request_id() for _ in prompts]
        for rid, prompt, p in zip(ids, prompts, params):
            try:
                self.engine.add_request(prompt, p, rid, sink=keep_final)
            except LowbitError as e:
                finals[rid] = RequestOutput(rid, prompt if isinstance(prompt, str) else None,
                                            [] if isinstance(prompt, str) else list(prompt),
                                            finished=True, finish_reason="error", error=e)
        while not all(i in finals for i in ids):
            self.engine.step()
        return [finals[i] for i in ids]

    def chat(self, messages: list[dict] | list[list[dict]], params: SamplingParams | Seq[SamplingParams] | None = None
             ) -> list[RequestOutput]:
        """messages: one conversation ([{"role", "content"}, ...]) or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        return self.generate([self.tokenizer.encode_chat(c) for c in conversations], params)

    def iter_outputs(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """`stream` for plain code: steps the engine in this thread and yields the request's outputs
        as tokens arrive (use `delta_text`); the last has finished=True. Closing the iterator early
        (or an exception in the caller, such as Ctrl-C) aborts the request and frees its cache."""
        outputs: deque[RequestOutput] = deque()
        rid = self.engine.add_request(prompt, params, sink=outputs.append)
        finished = False
        try:
            while not finished:
                if not outputs:
                    self.engine.step()
                while outputs:
                    out = outputs.popleft()
                    finished = out.finished
                    yield out
        finally:
            if not finished:
                self.engine.abort(rid)

    @property
    def async_engine(self):
        return self.start_async()

    def start_async(self, warm_up: bool = False):
        """The async engine (the server's), started on first call; warm_up: run one request through
        the model before the others (its `ready` event says when that is done)."""
        if self._async is None:
            from lowbit.engine.async_engine import AsyncEngine

            self._async = AsyncEngine(self.engine, warm_up)
        return self._async

    async def stream(self, prompt: Prompt, params: SamplingParams | None = None,
                     request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs as tokens arrive (use `delta_text`); the last has finished=True."""
        async for out in self.async_engine.add_request(prompt, params, request_id):
            yield out

    def shutdown(self) -> None:
        if self._async is not None:
            self._async.shutdown()
            self._async = None
