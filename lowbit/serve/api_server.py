"""An OpenAI-compatible HTTP server over one AsyncEngine (continuous batching across requests).

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health,
GET /metrics (Prometheus text), and with `ui=True` the chat page at /. Every error is answered in
OpenAI's shape, {"error": {"message", "type", "param", "code"}}; a bad request is refused before
it reaches the engine, so it never disturbs the others. A streaming client that goes away closes
its output iterator, which aborts its sequence and frees its cache blocks.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse

from lowbit.engine.sampling_params import SamplingParams
from lowbit.errors import LowbitError
from lowbit.serve.protocol import ChatCompletionRequest, CompletionRequest, ErrorResponse
from lowbit.serve.responses import (chat_chunk, chat_logprobs, chat_response, completion_chunk, completion_logprobs,
                                    completion_response, sse, usage)

STATIC = Path(__file__).resolve().parent / "static"


@dataclass
class ServerStats:
    """Counters for /metrics; touched only on the event loop."""

    started: float = field(default_factory=time.time)
    requests_total: dict = field(default_factory=dict)  # finish reason -> count
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    recent: deque = field(default_factory=deque)  # (time, tokens) over the last RATE_WINDOW_S

    RATE_WINDOW_S = 10.0

    def add_tokens(self, n: int) -> None:
        now = time.time()
        self.generation_tokens_total += n
        self.recent.append((now, n))
        while self.recent and self.recent[0][0] < now - self.RATE_WINDOW_S:
            self.recent.popleft()

    def tokens_per_s(self) -> float:
        now = time.time()
        return sum(n for t, n in self.recent if t >= now - self.RATE_WINDOW_S) / self.RATE_WINDOW_S


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

    # -- checks ------------------------------------------------------------------------------
    def check_model(self, name: str) -> None:
        if name not in self.names:
            raise ErrorResponse(404, f"model {name!r} does not exist; this server serves {self.model_name!r}",
                                param="model", code="model_not_found")

    def check_load(self) -> None:
        sched = self.engine.engine.scheduler
        if len(sched.waiting) >= self.max_waiting:
            raise ErrorResponse(429, f"server overloaded: {len(sched.waiting)} requests already waiting "
                                     f"(--max-waiting {self.max_waiting}); retry later", type_="rate_limit_error")

    def params_for(self, req, prompt_len: int, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        room = self.max_model_len - prompt_len
        if room < 1:
            raise ErrorResponse(400, f"the prompt has {prompt_len} tokens; this model's context is "
                                     f"{self.max_model_len} tokens, which leaves no room for an answer",
                                param="messages", code="context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            raise ErrorResponse(400, f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = "
                                     f"{prompt_len + max_tokens} exceeds the context of {self.max_model_len} tokens",
                                param="max_tokens", code="context_length_exceeded")
        try:
            return SamplingParams(max_tokens=max_tokens or room, temperature=req.temperature, top_p=req.top_p,
                                  seed=req.seed, stop=req.stop_list(), presence_penalty=req.presence_penalty,
                                  frequency_penalty=req.frequency_penalty, logprobs=logprobs)
        except LowbitError as e:
            raise ErrorResponse(400, str(e)) from None

    # -- running requests --------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, n: int) -> list[AsyncIterator]:
        """n independent samples of one prompt; with a seed, sample i uses seed + i."""
        streams = []
        for i in range(n):
            p = params
            if n > 1 and params.seed is not None:
                p = SamplingParams(**{**params.__dict__, "seed": params.seed + i})
            try:
                streams.append(self.engine.add_request(list(prompt_ids), p, f"req-{uuid.uuid4().hex}"))
            except LowbitError as e:
                raise ErrorResponse(400, str(e)) from None
        self.stats.prompt_tokens_total += len(prompt_ids) * n
        return streams

    async def final_outputs(self, streams: list[AsyncIterator]) -> list:
        async def last(stream):
            out = None
            async for out in stream:
                self.stats.add_tokens(len(out.delta_token_ids))
            return out

        outs = await asyncio.gather(*(last(s) for s in streams))
        for out in outs:
            self.finished(out)
        return outs

    def finished(self, out) -> None:
        if out.finish_reason == "error":
            raise ErrorResponse(500, str(out.error or "generation failed"), type_="server_error")
        self.stats.requests_total[out.finish_reason] = self.stats.requests_total.get(out.finish_reason, 0) + 1

    async def merged(self, streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
        """(choice index, output) from all n streams as they come; closing this closes them all."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i, stream):
            try:
                async for out in stream:
                    await queue.put((i, out))
            finally:
                await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        try:
            done = 0
            while done < len(streams):
                i, out = await queue.get()
                if out is None:
                    done += 1
                    continue
                self.stats.add_tokens(len(out.delta_token_ids))
                yield i, out
        finally:
            for t, s in zip(tasks, streams):
                t.cancel()
                await s.aclose()  # aborts a request still running (client gone)


def build_app(server: OpenAIServer, ui: bool = False) -> FastAPI:
    app = FastAPI(title="lowbit", docs_url=None, redoc_url=None)
    tok = server.tokenizer

    @app.exception_handler(ErrorResponse)
    async def _error(_req, e: ErrorResponse):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            msg = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
            where = ""
        else:
            msg = "; ".join(f"{'.'.join(str(p) for p in er.get('loc', ()) if p != 'body') or 'body'}: {er.get('msg')}"
                            for er in errs[:5])
        return JSONResponse(ErrorResponse(400, msg, param=where or None).body(), status_code=400)

    @app.exception_handler(404)
    async def _not_found(req: Request, _e):
        return JSONResponse(ErrorResponse(404, f"no route {req.method} {req.url.path}", code="not_found").body(),
                            status_code=404)

    @app.exception_handler(405)
    async def _bad_method(req: Request, _e):
        return JSONResponse(ErrorResponse(405, f"{req.method} is not allowed on {req.url.path}").body(),
                            status_code=405)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if server.api_key and request.url.path.startswith("/v1/"):
            got = request.headers.get("authorization", "")
            if got != f"Bearer {server.api_key}":
                why = "no API key given" if not got else "the API key is not valid"
                return JSONResponse(ErrorResponse(401, f"{why}: send 'Authorization: Bearer <key>'",
                                                  type_="authentication_error", code="invalid_api_key").body(),
                                    status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.model_name}

    @app.get("/metrics")
    async def metrics():
        sched = server.engine.engine.scheduler
        bm = server.engine.engine.block_manager
        s = server.stats
        lines = [
            ("lowbit_requests_running", "gauge", "sequences in the running batch", len(sched.running)),
            ("lowbit_requests_waiting", "gauge", "sequences waiting to be scheduled", len(sched.waiting)),
            ("lowbit_kv_blocks_used", "gauge", "KV cache blocks in use", bm.num_blocks - bm.num_free_blocks),
            ("lowbit_kv_blocks_total", "gauge", "KV cache blocks allocated", bm.num_blocks),
            ("lowbit_prompt_tokens_total", "counter", "prompt tokens submitted", s.prompt_tokens_total),
            ("lowbit_generation_tokens_total", "counter", "tokens generated", s.generation_tokens_total),
            ("lowbit_generation_tokens_per_second", "gauge", f"tokens generated per second over the last "
                                                             f"{s.RATE_WINDOW_S:.0f}s", round(s.tokens_per_s(), 3)),
        ]
        out = []
        for name, kind, help_, value in lines:
            out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
        out += ["# HELP lowbit_requests_finished_total requests finished, by reason",
                "# TYPE lowbit_requests_finished_total counter"]
        out += [f'lowbit_requests_finished_total{{reason="{r}"}} {n}' for r, n in sorted(s.requests_total.items())]
        return PlainTextResponse("\n".join(out) + "\n", media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": int(server.stats.started),
                                            "owned_by": "lowbit", "max_model_len": server.max_model_len}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        server.check_model(req.model)
        server.check_load()
        try:
            prompt_ids = tok.encode_chat([{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                                          for m in req.messages])
        except LowbitError as e:
            raise ErrorResponse(400, f"messages: {e}", param="messages") from None
        n_logprobs = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs is not None and not req.logprobs:
            raise ErrorResponse(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        params = server.params_for(req, len(prompt_ids), req.max_completion_tokens or req.max_tokens, n_logprobs)
        streams = server.submit(prompt_ids, params, req.n)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if not req.stream:
            outs = await server.final_outputs(streams)
            return chat_response(rid, created, server.model_name, outs, len(prompt_ids), tok, req.logprobs)

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events():
            for i in range(req.n):
                yield sse(chat_chunk(rid, created, server.model_name, i, {"role": "assistant", "content": ""}))
            completion_tokens = 0
            async for i, out in server.merged(streams):
                lp = chat_logprobs(out, tok, out.delta_token_ids) if req.logprobs else None
                if out.delta_text or lp:
                    yield sse(chat_chunk(rid, created, server.model_name, i, {"content": out.delta_text}, logprobs=lp))
                if out.finished:
                    completion_tokens += len(out.token_ids)
                    if out.finish_reason == "error":
                        yield sse(ErrorResponse(500, str(out.error), type_="server_error").body())
                        continue
                    server.finished(out)
                    yield sse(chat_chunk(rid, created, server.model_name, i, {}, finish=out.finish_reason))
            if include_usage:
                yield sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                           "model": server.model_name, "choices": [],
                           "usage": usage(len(prompt_ids) * req.n, completion_tokens)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        server.check_model(req.model)
        server.check_load()
        p = req.prompt
        if isinstance(p, list) and p and isinstance(p[0], str):
            if len(p) != 1:
                raise ErrorResponse(400, "prompt: a list of several strings is not supported; send one prompt a "
                                         "request", param="prompt")
            p = p[0]
        if isinstance(p, str):
            prompt_ids = tok.encode(p)
            prompt_text = p
        else:
            vocab = tok.vocab_size
            if not p or not all(0 <= t < vocab for t in p):
                raise ErrorResponse(400, f"prompt: token ids must be a non-empty list of integers in [0, {vocab})",
                                    param="prompt")
            prompt_ids, prompt_text = list(p), tok.decode(list(p), skip_special_tokens=False)
        if not prompt_ids:
            raise ErrorResponse(400, "prompt: empty", param="prompt")
        params = server.params_for(req, len(prompt_ids), req.max_tokens, req.logprobs)
        streams = server.submit(prompt_ids, params, req.n)
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        echo = prompt_text if req.echo else ""
        if not req.stream:
            outs = await server.final_outputs(streams)
            return completion_response(rid, created, server.model_name, outs, len(prompt_ids), tok,
                                       req.logprobs is not None, echo)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events():
            completion_tokens = 0
            sent_echo = set()
            async for i, out in server.merged(streams):
                text = out.delta_text
                if echo and i not in sent_echo:
                    text, _ = echo + text, sent_echo.add(i)
                lp = completion_logprobs(out, tok, out.delta_token_ids) if req.logprobs is not None else None
                if text or lp:
                    yield sse(completion_chunk(rid, created, server.model_name, i, text, None, lp))
                if out.finished:
                    completion_tokens += len(out.token_ids)
                    if out.finish_reason == "error":
                        yield sse(ErrorResponse(500, str(out.error), type_="server_error").body())
                        continue
                    server.finished(out)
                    yield sse(completion_chunk(rid, created, server.model_name, i, "", out.finish_reason, None))
            if include_usage:
                yield sse({"id": rid, "object": "text_completion", "created": created, "model": server.model_name,
                           "choices": [], "usage": usage(len(prompt_ids) * req.n, completion_tokens)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/")
    async def index():
        if not ui:
            return {"lowbit": "OpenAI-compatible API under /v1", "model": server.model_name,
                    "ui": "start with --ui for the chat page"}
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    return app


def serve(model: str = "default", host: str = "127.0.0.1", port: int = 23333, kv_bits: int = 16,
          api_key: str | None = None, max_batch_size: int = 64, max_model_len: int | None = None,
          max_waiting: int = 256, ui: bool = False, served_model_name: str | None = None,
          dtype: str = "auto", device: str | None = None) -> None:
    import uvicorn

    from lowbit.engine.llm import LLM
    from lowbit.models.default import resolve_model

    path = resolve_model(model)
    llm = LLM(model, kv_bits=kv_bits, max_batch_size=max_batch_size, max_model_len=max_model_len, dtype=dtype,
              device=device)
    name = served_model_name or (path.stem if path.is_file() else path.name)
    server = OpenAIServer(llm.async_engine, llm.tokenizer, name, api_key, max_waiting, aliases=(model,))
    app = build_app(server, ui)
    print(f"lowbit serve: {name} on http://{host}:{port}/v1 (max_model_len {server.max_model_len}, kv_bits {kv_bits})"
          + (f"; chat page at http://{host}:{port}/" if ui else ""), flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        llm.shutdown()
