"""The OpenAI-compatible HTTP routes over one OpenAIServer, and `serve` to run them with uvicorn.

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health,
GET /metrics (Prometheus text), and with `ui=True` the chat page at /. Every error is answered in
OpenAI's shape, {"error": {"message", "type", "param", "code"}}; a bad request is refused before
it reaches the engine, so it never disturbs the others.
"""
from __future__ import annotations

import contextlib
import hmac
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse

from lowbit.errors import LowbitError
from lowbit.serve.protocol import ChatCompletionRequest, CompletionRequest, ErrorResponse
from lowbit.serve.responses import (UsageSoFar, answer_delta, chat_chunk, chat_logprobs, chat_message,
                                    chat_response, completion_chunk, completion_logprobs, completion_response, sse,
                                    usage)
from lowbit.serve.serving import OpenAIServer
from lowbit.serve.tools import StreamedChoice

STATIC = Path(__file__).resolve().parent / "static"
CLIENT_CLOSED = 499  # nginx's status for "the client went away"; nobody reads it


class RequireAPIKey:
    """Answers a /v1/ request without 'Authorization: Bearer KEY' with 401 before its body is read.
    Plain ASGI rather than FastAPI's @middleware, which runs the response in a task of its own and
    gets in the way of noticing a client that left mid-stream."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            got = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(got, self.expected):
                why = "no API key given" if not got else "the API key is not valid"
                body = ErrorResponse(401, f"{why}: send 'Authorization: Bearer <key>'", type_="authentication_error",
                                     code="invalid_api_key").body()
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _error_handlers(app: FastAPI) -> None:
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

    @app.exception_handler(Exception)
    async def _bug(_req, e: Exception):  # logged with its traceback by uvicorn; the client still gets JSON
        return JSONResponse(ErrorResponse(500, f"internal error: {type(e).__name__}: {e}", type_="server_error").body(),
                            status_code=500)

    @app.exception_handler(404)
    async def _not_found(req: Request, _e):
        return JSONResponse(ErrorResponse(404, f"no route {req.method} {req.url.path}", code="not_found").body(),
                            status_code=404)

    @app.exception_handler(405)
    async def _bad_method(req: Request, _e):
        return JSONResponse(ErrorResponse(405, f"{req.method} is not allowed on {req.url.path}").body(),
                            status_code=405)


def _check_stream_options(req) -> tuple[bool, bool]:
    """-> (a last chunk with usage, usage so far on every chunk)."""
    if req.stream_options is not None and not req.stream:
        raise ErrorResponse(400, "stream_options is only allowed with stream: true", param="stream_options")
    opts = req.stream_options
    return bool(opts and opts.include_usage), bool(opts and opts.continuous_usage_stats)


def build_app(server: OpenAIServer, ui: bool = False) -> FastAPI:
    app = FastAPI(title="lowbit", docs_url=None, redoc_url=None)
    _error_handlers(app)
    if server.api_key:
        app.add_middleware(RequireAPIKey, api_key=server.api_key)
    tok = server.tokenizer
    name = server.model_name

    @app.get("/health")
    async def health():
        # 503 until the engine has warmed up, so a load balancer (or a test) sends nobody early
        engine = server.engine
        if not engine.ready.is_set():
            return JSONResponse({"status": "starting", "model": name}, status_code=503)
        if engine.warmup_error:
            return JSONResponse({"status": "failed", "model": name, "error": f"warm-up: {engine.warmup_error}"},
                                status_code=503)
        return {"status": "ok", "model": name, "warmup_s": engine.warmup_s}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics_text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": int(server.stats.started),
                                            "owned_by": "lowbit", "max_model_len": server.max_model_len}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        server.check_model(req.model)
        include_usage, continuous_usage = _check_stream_options(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise ErrorResponse(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        server.check_load(req.n)
        tool_mode = req.tool_mode
        try:
            prompt_ids = tok.encode_chat([m.for_template() for m in req.messages], tools=tool_mode.template_tools())
        except LowbitError as e:
            raise ErrorResponse(400, f"messages: {e}", param="messages") from None
        n_logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = server.params_for(req, len(prompt_ids), req.max_completion_tokens or req.max_tokens, n_logprobs)
        sub = server.submit(prompt_ids, params, req.n)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if not req.stream:
            outs = await server.final_outputs(sub, request)
            if outs is None:
                return Response(status_code=CLIENT_CLOSED)
            _raise_failed(outs)
            return chat_response(rid, created, name, outs, len(prompt_ids), tok, req.logprobs, tool_mode)

        async def events():
            so_far = UsageSoFar(len(prompt_ids), req.n, continuous_usage)
            for i in range(req.n):
                yield sse(so_far.stamp(chat_chunk(rid, created, name, i, {"role": "assistant", "content": ""})))
            completion_tokens = 0
            choices = [StreamedChoice(tool_mode) for _ in range(req.n)]  # content and tool calls as they come
            async with contextlib.aclosing(server.merged(sub)) as outputs:
                async for i, out in outputs:
                    so_far.add(i, out)
                    parts = []  # one write for all that this output brings (text, then the finish)
                    ended = out.finish_reason if out.finished and out.finish_reason != "error" else None
                    deltas = choices[i].deltas(out.delta_text, ended)
                    lp = chat_logprobs(out, tok, out.delta_token_ids) if req.logprobs and not tool_mode.buffers else None
                    if lp and not deltas:
                        deltas = [{"content": ""}]
                    for k, delta in enumerate(deltas):  # the logprobs go with the last
                        parts.append(so_far.stamp(chat_chunk(rid, created, name, i, delta,
                                                              logprobs=lp if k == len(deltas) - 1 else None)))
                    if out.finished:
                        completion_tokens += len(out.token_ids)
                        finish = out.finish_reason
                        if finish == "error":
                            parts.append(ErrorResponse(500, str(out.error), type_="server_error").body())
                        else:
                            finish = choices[i].finish_reason(finish)
                            if tool_mode.buffers:  # tool calls are known once the answer is whole
                                message, finish = chat_message(out, tool_mode)
                                delta = answer_delta(message["content"], message.get("tool_calls"))
                                lp = chat_logprobs(out, tok, out.token_ids) if req.logprobs else None
                                if delta or lp:
                                    parts.append(so_far.stamp(chat_chunk(rid, created, name, i, delta, logprobs=lp)))
                            parts.append(so_far.stamp(chat_chunk(rid, created, name, i, {}, finish=finish)))
                    if parts:
                        yield "".join(sse(p) for p in parts)
            if include_usage:
                yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                           "choices": [], "usage": usage(len(prompt_ids) * req.n, completion_tokens)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        server.check_model(req.model)
        include_usage, continuous_usage = _check_stream_options(req)
        server.check_load(req.n)
        prompt_ids, prompt_text = _completion_prompt(req.prompt, tok)
        params = server.params_for(req, len(prompt_ids), req.max_tokens, req.logprobs)
        sub = server.submit(prompt_ids, params, req.n)
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        echo = prompt_text if req.echo else ""
        if not req.stream:
            outs = await server.final_outputs(sub, request)
            if outs is None:
                return Response(status_code=CLIENT_CLOSED)
            _raise_failed(outs)
            return completion_response(rid, created, name, outs, len(prompt_ids), tok, req.logprobs is not None, echo)

        async def events():
            so_far = UsageSoFar(len(prompt_ids), req.n, continuous_usage)
            completion_tokens = 0
            echoed = set()
            async with contextlib.aclosing(server.merged(sub)) as outputs:
                async for i, out in outputs:
                    so_far.add(i, out)
                    text = out.delta_text
                    if echo and i not in echoed:
                        text = echo + text
                        echoed.add(i)
                    lp = completion_logprobs(out, tok, out.delta_token_ids) if req.logprobs is not None else None
                    parts = []  # one write for all that this output brings (text, then the finish)
                    if text or lp:
                        parts.append(so_far.stamp(completion_chunk(rid, created, name, i, text, None, lp)))
                    if out.finished:
                        completion_tokens += len(out.token_ids)
                        if out.finish_reason == "error":
                            parts.append(ErrorResponse(500, str(out.error), type_="server_error").body())
                        else:
                            parts.append(so_far.stamp(completion_chunk(rid, created, name, i, "", out.finish_reason,
                                                                        None)))
                    if parts:
                        yield "".join(sse(p) for p in parts)
            if include_usage:
                yield sse({"id": rid, "object": "text_completion", "created": created, "model": name,
                           "choices": [], "usage": usage(len(prompt_ids) * req.n, completion_tokens)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/")
    async def index():
        if not ui:
            return {"lowbit": "OpenAI-compatible API under /v1", "model": name,
                    "ui": "start with --ui for the chat page"}
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    return app


def _raise_failed(outs) -> None:
    for out in outs:
        if out.finish_reason == "error":
            raise ErrorResponse(500, str(out.error or "generation failed"), type_="server_error")


def _completion_prompt(p, tok) -> tuple[list[int], str]:
    """The completions API's prompt (a string, a one-string list or token ids) -> (ids, text)."""
    if isinstance(p, list) and p and isinstance(p[0], str):
        if len(p) != 1:
            raise ErrorResponse(400, "prompt: a list of several strings is not supported; send one prompt a request",
                                param="prompt")
        p = p[0]
    if isinstance(p, str):
        ids, text = tok.encode(p), p
    else:
        vocab = tok.vocab_size
        if not p or not all(0 <= t < vocab for t in p):
            raise ErrorResponse(400, f"prompt: token ids must be a non-empty list of integers in [0, {vocab})",
                                param="prompt")
        ids, text = list(p), tok.decode(list(p), skip_special_tokens=False)
    if not ids:
        raise ErrorResponse(400, "prompt: empty", param="prompt")
    return ids, text


def _check_port_free(host: str, port: int) -> None:
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            s.bind((host, port))
    except OSError as e:
        raise LowbitError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host") from None


def serve(model: str = "default", host: str = "127.0.0.1", port: int = 23333, kv_bits: int = 16,
          api_key: str | None = None, max_batch_size: int = 64, max_model_len: int | None = None,
          max_waiting: int = 256, ui: bool = False, served_model_name: str | None = None,
          dtype: str = "auto", device: str | None = None, dummy_weights: bool = False, arch: str | None = None,
          w_bits: int = 16, group_size: int = 128, tp: int = 1) -> None:
    if arch and not dummy_weights:
        raise LowbitError(f"--arch {arch} names the shapes of --dummy-weights; add --dummy-weights, or drop --arch "
                          "to serve MODEL's own weights")
    import uvicorn

    from lowbit.engine.llm import LLM

    _check_port_free(host, port)  # before the model loads, not after
    net, tok, ckpt, name = _load(model, dummy_weights, arch, w_bits, group_size, dtype, device)
    name = served_model_name or name
    llm = LLM((net, tok, ckpt), kv_bits=kv_bits, max_batch_size=max_batch_size, max_model_len=max_model_len,
              tensor_parallel_size=tp)
    # the app listens at once; /health says "starting" until the engine thread has warmed up
    server = OpenAIServer(llm.start_async(warm_up=True), llm.tokenizer, name, api_key, max_waiting,
                          aliases=(arch if dummy_weights else model,))
    app = build_app(server, ui)
    print(f"lowbit serve: {name} on http://{host}:{port}/v1 (max_model_len {server.max_model_len}, kv_bits {kv_bits}, "
          f"max_batch_size {max_batch_size})" + (f"; chat page at http://{host}:{port}/" if ui else ""), flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        llm.close()


def _load(model, dummy_weights, arch, w_bits, group_size, dtype, device):
    """-> (model, tokenizer, checkpoint, served name): MODEL's weights, or dummy weights of arch's
    shapes whose tokenizer takes text as bytes (lowbit/serve/dummy_text.py)."""
    from lowbit.bench.common import ModelSpec
    from lowbit.models.default import resolve_model

    spec = ModelSpec(model, dummy_weights, arch, w_bits, group_size, dtype, device)
    net, tok, ckpt = spec.load()
    if dummy_weights:
        from lowbit.serve.dummy_text import ByteChatTokenizer

        return net, ByteChatTokenizer(tok.vocab_size), ckpt, f"dummy-{arch}" + ("" if w_bits == 16 else f"-w{w_bits}")
    path = resolve_model(model)
    return net, tok, ckpt, (path.stem if path.is_file() else path.name)
