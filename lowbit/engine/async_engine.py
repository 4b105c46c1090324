"""Streaming for asyncio code (the OpenAI server): a background thread steps the engine while
there is work; each request's outputs arrive on its own asyncio queue.

The event loop never waits for a model step: new requests and aborts are handed to the engine
thread through a queue, and outputs come back with `call_soon_threadsafe`.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import AsyncIterator

from lowbit.engine.llm_engine import LLMEngine, Prompt
from lowbit.engine.outputs import RequestOutput
from lowbit.engine.sampling_params import SamplingParams
from lowbit.errors import LowbitError

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._pending: queue.SimpleQueue = queue.SimpleQueue()  # ("add", RequestState) | ("abort", id)
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="lowbit-engine", daemon=True)
        self._thread.start()

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None,
                    request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Queues a request and returns its outputs as an async iterator; the last output has
        finished=True. A bad request raises LowbitError here, before anything is queued. Closing
        the iterator early (`aclose()`, or a client that went away) aborts the request."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()

        def sink(out: RequestOutput) -> None:
            try:
                loop.call_soon_threadsafe(outputs.put_nowait, out)
            except RuntimeError:  # the caller's event loop is closed: nobody is listening
                if not out.finished:
                    self.abort(out.request_id)

        state = self.engine.make_request(prompt, params, request_id, sink)
        self._pending.put(("add", state))
        self._wake.set()
        return self._iterate(state.seq.request_id, outputs)

    async def _iterate(self, request_id: str, outputs: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._pending.put(("abort", request_id))
        self._wake.set()

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

    def _loop(self) -> None:
        while not self._stopped:
            self._wake.clear()
            self._take_pending()
            if not self.engine.has_unfinished():
                self._wake.wait()
                continue
            try:
                self.engine.step()
            except Exception as e:  # a bug, not a bad request: fail what runs, keep serving
                log.exception("engine step failed")
                for rid in list(self.engine.requests):
                    self.engine.abort(rid, LowbitError(f"request {rid}: engine step failed: {e}"))

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=60)
