"""The server's side of the engine: checks a request against the model and the load, submits its
n samples to the one AsyncEngine (continuous batching with every other request), and collects
their outputs, whole or as they stream. A request whose client goes away is aborted here, by id,
so its sequence leaves the batch and its KV blocks are freed at once."""
from __future__ import annotations

import asyncio
import dataclasses
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from lowbit.engine.outputs import RequestOutput
from lowbit.engine.sampling_params import SamplingParams
from lowbit.errors import LowbitError
from lowbit.serve.metrics import ServerStats, prometheus_text
from lowbit.serve.protocol import ErrorResponse

DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks that its client is still there


@dataclass
class Submitted:
    """The n samples of one API request, as engine requests."""

    request_ids: list[str]
    streams: list[AsyncIterator[RequestOutput]]


class OpenAIServer:
    def __init__(self, async_engine, tokenizer, model_name: str, api_key: str | None = None,
                 max_waiting: int = 256, aliases: tuple[str, ...] = ()):
        self.engine = async_engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.names = {model_name, *aliases}
        self.api_key = api_key
        self.max_waiting = max_waiting
        self.max_model_len = async_engine.engine.config.max_model_len
        self.stats = ServerStats()
        self.live: set[str] = set()  # engine request ids submitted here and not yet finished

    # -- checks ------------------------------------------------------------------------------
    def check_model(self, name: str) -> None:
        if name not in self.names:
            raise ErrorResponse(404, f"model {name!r} does not exist; this server serves {self.model_name!r}",
                                param="model", code="model_not_found")

    def load(self) -> tuple[int, int]:
        """(running, waiting) sequences. Waiting also counts requests still on their way to the
        scheduler (the engine thread takes new requests between steps), so a burst is seen whole."""
        sched = self.engine.engine.scheduler
        running = len(sched.running)
        return running, max(len(sched.waiting), len(self.live) - running)

    def check_load(self, n: int = 1) -> None:
        _, waiting = self.load()
        if waiting + n > self.max_waiting:
            raise ErrorResponse(429, f"server overloaded: {waiting} requests already waiting for a place in the "
                                     f"batch (--max-waiting {self.max_waiting}); retry later",
                                type_="rate_limit_error", code="overloaded")

    def params_for(self, req, prompt_len: int, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        room = self.max_model_len - prompt_len
        if room < 1:
            raise ErrorResponse(400, f"the prompt has {prompt_len} tokens; this model's context is "
                                     f"{self.max_model_len} tokens, which leaves no room for an answer",
                                param="messages", code="context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            raise ErrorResponse(400, f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = "
                                     f"{prompt_len + max_tokens} exceeds the context of {self.max_model_len} tokens; "
                                     f"ask for at most {room} tokens or shorten the prompt",
                                param="max_tokens", code="context_length_exceeded")
        try:
            return SamplingParams(max_tokens=max_tokens or room, temperature=req.temperature, top_p=req.top_p,
                                  seed=req.seed, stop=req.stop_list(), presence_penalty=req.presence_penalty,
                                  frequency_penalty=req.frequency_penalty, logprobs=logprobs,
                                  logit_bias=req.logit_bias_ids(self.engine.engine.vocab_size),
                                  structured_output=req.structured_output())
        except LowbitError as e:
            raise ErrorResponse(400, str(e)) from None

    # -- running requests --------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, n: int) -> Submitted:
        """n independent samples of one prompt; with a seed, sample i uses seed + i."""
        sub = Submitted([], [])
        for i in range(n):
            p = dataclasses.replace(params, seed=params.seed + i) if n > 1 and params.seed is not None else params
            rid = f"req-{uuid.uuid4().hex}"
            try:
                sub.streams.append(self.engine.add_request(list(prompt_ids), p, rid))
            except LowbitError as e:
                self.abort(sub)
                raise ErrorResponse(400, str(e)) from None
            sub.request_ids.append(rid)
            self.live.add(rid)
        self.stats.prompt_tokens_total += len(prompt_ids) * n
        return sub

    def settle(self, out: RequestOutput) -> None:
        """Books a request's final output."""
        if out.request_id in self.live:
            self.live.discard(out.request_id)
            self.stats.count_finished(out.finish_reason)

    def abort(self, sub: Submitted) -> None:
        """Stops whatever of sub still runs (its client went away); finished samples are left alone."""
        for rid in sub.request_ids:
            if rid in self.live:
                self.live.discard(rid)
                self.stats.count_finished("abort")
                self.engine.abort(rid)

    async def final_outputs(self, sub: Submitted, request=None) -> list[RequestOutput] | None:
        """The last output of each sample; None (and the samples aborted) when the client of
        `request` disconnects first."""

        async def last(stream):
            out = None
            async for out in stream:
                self.stats.add_tokens(len(out.delta_token_ids))
            return out

        work = asyncio.gather(*(last(s) for s in sub.streams))
        # once cancelled (client gone) nobody awaits it: fetch its outcome so asyncio does not log it
        work.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            while not work.done():
                await asyncio.wait({work}, timeout=DISCONNECT_POLL_S)
                if not work.done() and request is not None and await request.is_disconnected():
                    return None
        finally:
            if not work.done():  # client gone, or this handler cancelled
                work.cancel()
                self.abort(sub)
        outs = work.result()
        for out in outs:
            self.settle(out)
        return outs

    async def merged(self, sub: Submitted) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(sample index, output) from all n samples as they come. Leaving early (the client went
        away) aborts the samples still running."""
        if len(sub.streams) == 1:  # the common case, without a task and a queue between engine and socket
            try:
                async for out in sub.streams[0]:
                    self.stats.add_tokens(len(out.delta_token_ids))
                    if out.finished:
                        self.settle(out)
                    yield 0, out
            finally:
                self.abort(sub)
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i, stream):
            try:
                async for out in stream:
                    queue.put_nowait((i, out))
            finally:
                queue.put_nowait((i, None))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(sub.streams)]
        try:
            done = 0
            while done < len(tasks):
                i, out = await queue.get()
                if out is None:
                    done += 1
                    continue
                self.stats.add_tokens(len(out.delta_token_ids))
                if out.finished:
                    self.settle(out)
                yield i, out
        finally:
            # no awaiting here: when the client is gone this runs inside a cancelled scope
            for t in tasks:
                t.cancel()
            self.abort(sub)

    def metrics_text(self) -> str:
        running, waiting = self.load()
        bm = self.engine.engine.block_manager
        return prometheus_text(self.stats, running, waiting, bm.num_blocks - bm.num_free_blocks, bm.num_blocks)
