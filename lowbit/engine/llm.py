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
                 enforce_eager: bool = False, tensor_parallel_size: int = 1, num_scheduler_steps: int | None = None):
        """model: `default`, a .gguf file or an HF / quantized directory; or the (model, tokenizer,
        checkpoint) triple that `load_model` returns, to share weights already loaded.
        enforce_eager: decode without CUDA graphs (on a GPU they are captured at start-up).
        num_scheduler_steps: greedy decode steps run per host round trip (default 8 with CUDA graphs,
        1 otherwise); each step's tokens reach the outputs as soon as the GPU has them.
        tensor_parallel_size: ranks to split the model over (one process and GPU each; gloo
        processes on the CPU), Megatron-style (engine/tp_workers.py); a given triple is sharded in
        place, and must come from a checkpoint path or be dummy weights (the other ranks load the
        same path, or rebuild the dummy weights from their recipe)."""
        self._async = None
        self._tp = None
        config = EngineConfig(kv_bits, max_batch_size, max_model_len, gpu_memory_utilization, block_size,
                              max_num_batched_tokens, enable_prefix_caching, num_kv_blocks, enforce_eager,
                              num_scheduler_steps)
        if tensor_parallel_size != 1:
            net, tokenizer, ckpt = self._start_ranks(model, dtype, device, config, tensor_parallel_size)
        elif isinstance(model, tuple):
            net, tokenizer, ckpt = model
        else:
            from lowbit.loading.loader import load_model
            from lowbit.models.default import resolve_model

            net, tokenizer, ckpt = load_model(resolve_model(str(model)), dtype, device)
        eos = tokenizer.stop_token_ids(ckpt.generation_config().get("eos_token_id"))
        self.tokenizer = tokenizer
        try:
            self.engine = LLMEngine(net, tokenizer, config, eos)
        except Exception as e:
            if self._tp is None:
                raise
            error = self._tp.failure(e)
            self.close()
            raise error from e
        if self._tp is not None:
            self.engine.runner.explain_failure = self._tp.failure

    def _start_ranks(self, model, dtype, device, config: EngineConfig, world: int):
        """Starts ranks 1..world-1, joins them as rank 0 and returns rank 0's shard of the model."""
        import torch

        from lowbit.engine.tp_workers import ModelSource, TPWorkers, rank_device
        from lowbit.loading.loader import default_device

        if world < 1:
            raise LowbitError(f"tensor_parallel_size={world}: must be at least 1")
        if isinstance(model, tuple):
            dev = model[0].model.embed_tokens.weight.device
        else:
            dev = torch.device(device) if device else default_device()
        if dev.type == "cuda" and torch.cuda.device_count() < world:
            raise LowbitError(f"tensor_parallel_size={world}: this machine has {torch.cuda.device_count()} GPU(s)")
        from lowbit.models.llama import LlamaModel

        if isinstance(model, tuple):  # the other ranks load the same checkpoint, or rebuild the dummy weights
            net, ckpt = model[0], model[2]
            recipe, path = getattr(ckpt, "recipe", None), Path(getattr(ckpt, "source", ""))
            if recipe is None and not path.exists():
                raise LowbitError("tensor parallelism loads the model in every rank: give a checkpoint path "
                                  "(or dummy weights), not a model built in memory")
            dtype_now = net.model.embed_tokens.weight.dtype
            source = ModelSource(dummy=recipe) if recipe else ModelSource(path=str(path), dtype=dtype_now)
            model_config = ckpt.config
        else:
            from lowbit.loading.loader import open_checkpoint
            from lowbit.models.default import resolve_model

            source = ModelSource(path=str(resolve_model(str(model))), dtype=dtype)
            model_config = open_checkpoint(source.path).config
        LlamaModel.check_shardable(model_config, world)
        self._tp = TPWorkers(world, source, dev, config)
        try:
            triple = model if isinstance(model, tuple) else source.load(rank_device(dev, 0), (0, world))
            triple[0].shard(0, world)  # (a model built whole in memory; a no-op for the shard just loaded)
        except Exception:
            self.close()
            raise
        return triple

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

    def close(self) -> None:
        """Stops the async engine and, with tensor parallelism, the other ranks' processes."""
        self.shutdown()
        if self._tp is not None:
            engine = getattr(self, "engine", None)  # absent when LLMEngine failed to start
            if engine is not None:
                engine.runner.release_graphs()  # before the NCCL group goes (ModelRunner.release_graphs)
            self._tp.close()
            self._tp = None
