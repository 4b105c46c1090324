"""Streaming for asyncio code (the OpenAI server): a background thread steps the engine while
there is work; each request's outputs arrive on its caller's event loop.

The engine's thread never waits on the event loop, and does no text work: new requests and
aborts reach it through a queue; its outputs (token ids only) go back once per step, all of a
step's outputs in one `call_soon_threadsafe`. On the event loop each request's Detokenizer makes
the text and finds stop strings (a hit aborts the request in the engine), and outputs that
piled up while the loop was busy are merged, so a stream sends one chunk per wake-up with every
token ready.

With warm_up, the thread first runs one request through the model (see `warm_up`) and only then
sets `ready`: the server answers /health with 503 until it is set, so the first users do not pay
for compiling kernels. Requests that come meanwhile wait in the queue.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from typing import AsyncIterator

from lowbit.engine.detokenizer import Detokenizer
from lowbit.engine.llm_engine import LLMEngine, Prompt
from lowbit.engine.outputs import RequestOutput
from lowbit.engine.sampling_params import SamplingParams
from lowbit.errors import LowbitError

log = logging.getLogger(__name__)

# Prompt tokens of the warm-up request on the CPU: one short forward is all there is to warm.
CPU_WARMUP_PROMPT_TOKENS = 16


class _Stream:
    """One request's side on its event loop: the text, and the outputs not yet taken."""

    def __init__(self, detokenizer: Detokenizer):
        self.detokenizer = detokenizer
        self.ready: list[RequestOutput] = []
        self.waiter: asyncio.Future | None = None
        self.done = False  # its last output is in `ready` (or was taken)
        self.stopped_here = False  # it ended on this side (a stop string): the engine is to abort it

    def feed(self, out: RequestOutput) -> None:
        if self.done:  # after a stop string, the engine's own last output (the abort) says nothing new
            return
        taken = self.detokenizer.add(out.delta_token_ids)
        if taken is not None and not out.finished:
            # as the engine does when it finds a stop string itself: the tokens after the one that
            # completed it were computed ahead (the engine ran on) and are not part of the answer
            extra = len(out.delta_token_ids) - taken
            out.delta_token_ids = out.delta_token_ids[:taken]
            out.token_ids = out.token_ids[:len(out.token_ids) - extra]
            if out.logprobs is not None:
                out.logprobs = out.logprobs[:len(out.token_ids)]
            out.finished, out.finish_reason = True, "stop"
            self.stopped_here = True
        out.text, out.delta_text = self.detokenizer.take(out.finished)
        self.done = out.finished
        self.ready.append(out)
        self.wake()

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def take(self) -> RequestOutput:
        """Everything ready, as one output whose deltas hold all of it."""
        outs, self.ready = self.ready, []
        last = outs[-1]
        if len(outs) > 1:
            last.delta_text = "".join(o.delta_text for o in outs)
            last.delta_token_ids = [t for o in outs for t in o.delta_token_ids]
        return last


class AsyncEngine:
    def __init__(self, engine: LLMEngine, warm_up: bool = False):
        self.engine = engine
        self._pending: queue.SimpleQueue = queue.SimpleQueue()  # ("add", RequestState) | ("abort", id)
        self._wake = threading.Event()
        self._wake_soon: set[asyncio.AbstractEventLoop] = set()  # loops with a wake-up already scheduled
        # outputs of the step under way, sent to their loops when it ends: (loop, stream, output)
        # (a deque: another thread stepping the engine, LLM.generate's, may append to it meanwhile)
        self._outbox: deque[tuple[asyncio.AbstractEventLoop, _Stream, RequestOutput]] = deque()
        self._stopped = False
        self._warm_up = warm_up
        self.ready = threading.Event()  # set once the warm-up (if any) is done
        self.warmup_s: float | None = None
        self.warmup_error: str | None = None  # why the warm-up failed (the model is broken)
        self._thread = threading.Thread(target=self._loop, name="lowbit-engine", daemon=True)
        self._thread.start()

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None,
                    request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Queues a request and returns its outputs as an async iterator; the last output has
        finished=True. A bad request raises LowbitError here, before anything is queued. Closing
        the iterator early (`aclose()`, or a client that went away) aborts the request."""
        loop = asyncio.get_running_loop()
        state = self.engine.make_request(prompt, params, request_id, detokenize=False)
        seq = state.seq
        stream = _Stream(Detokenizer(self.engine.tokenizer, seq.params, seq.token_ids[:seq.num_prompt_tokens]))
        state.sink = lambda out: self._post(loop, stream, out)
        self._pending.put(("add", state))
        # Woken once this pass of the event loop is over, not per request: the requests of a burst
        # that arrive together reach the scheduler together and share one prefill step.
        if loop not in self._wake_soon:
            self._wake_soon.add(loop)
            loop.call_soon(self._wake_from, loop)
        return self._iterate(seq.request_id, stream)

    def _wake_from(self, loop) -> None:
        self._wake_soon.discard(loop)
        self._wake.set()

    async def _iterate(self, request_id: str, stream: _Stream) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                if not stream.ready:
                    stream.waiter = asyncio.get_running_loop().create_future()
                    await stream.waiter
                    stream.waiter = None
                out = stream.take()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._pending.put(("abort", request_id))
        self._wake.set()

    # -- the engine's thread -----------------------------------------------------------------
    def _post(self, loop, stream: _Stream, out: RequestOutput) -> None:
        """The sink of every request: keeps the output for the end of the step."""
        self._outbox.append((loop, stream, out))
        if threading.current_thread() is not self._thread:  # stepped elsewhere (LLM.generate): flush here
            self._wake.set()

    def _flush(self) -> None:
        """Hands the step's outputs to their event loops, one call per loop."""
        by_loop: dict = {}
        while self._outbox:
            loop, stream, out = self._outbox.popleft()
            by_loop.setdefault(loop, []).append((stream, out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(self._deliver, items)
            except RuntimeError:  # the caller's event loop is closed: nobody is listening
                for _, out in items:
                    if not out.finished:
                        self.engine.abort(out.request_id)

    def _take_pending(self) -> None:
        while True:
            try:
                kind, item = self._pending.get_nowait()
            except queue.Empty:
                return
            if kind == "abort":
                self.engine.abort(item)
                continue
            try:
                self.engine.add(item)
            except LowbitError as e:  # a duplicate id: only this request fails
                item.sink(item.reject(e))

    def warm_up(self) -> None:
        """One request through the engine's own path, prefill then a decode step, so what runs
        on first use (Triton compiling and tuning for the largest prompt chunk, allocator growth)
        happens before users come; decode CUDA graphs were captured when the runner was built.
        On the CPU a short prompt: there is nothing to compile."""
        c = self.engine.config
        on_gpu = self.engine.runner.device.type == "cuda"
        n = min(c.max_num_batched_tokens if on_gpu else CPU_WARMUP_PROMPT_TOKENS, c.max_model_len - 2)
        t0 = time.perf_counter()
        if n >= 1:
            ids = [i % self.engine.vocab_size for i in range(n)]
            rid = self.engine.add_request(ids, SamplingParams(max_tokens=2, ignore_eos=True), f"warmup-{id(self)}")
            while rid in self.engine.requests:
                self.engine.step()
        self.warmup_s = time.perf_counter() - t0
        log.info("engine warm-up took %.2fs", self.warmup_s)

    def _loop(self) -> None:
        if self._warm_up:
            try:
                self.warm_up()
            except Exception as e:  # the model cannot run: /health says so instead of "ok"
                log.exception("engine warm-up failed")
                self.warmup_error = f"{type(e).__name__}: {e}"
        self.ready.set()
        while not self._stopped:
            self._wake.clear()
            self._take_pending()
            self._flush()
            if not self.engine.has_unfinished():
                self._wake.wait()
                continue
            try:
                self.engine.step()
            except Exception as e:  # a bug, not a bad request: fail what runs, keep serving
                log.exception("engine step failed")
                for rid in list(self.engine.requests):
                    self.engine.abort(rid, LowbitError(f"request {rid}: engine step failed: {e}"))
            self._flush()

    # -- the event loop ----------------------------------------------------------------------
    def _deliver(self, items: list[tuple[_Stream, RequestOutput]]) -> None:
        """One step's outputs, turned into text and handed to their streams."""
        for stream, out in items:
            try:
                stream.feed(out)
            except Exception as e:  # a tokenizer failure fails this request only
                log.exception("request %s: making its text failed", out.request_id)
                out.finished, out.finish_reason = True, "error"
                out.error = LowbitError(f"request {out.request_id}: {e}")
                stream.stopped_here, stream.done = True, True
                stream.ready.append(out)
                stream.wake()
            if stream.stopped_here:
                stream.stopped_here = False
                self.abort(out.request_id)  # the engine is still running it: stop it, free its blocks

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=60)

