"""OpenAI response bodies built from the engine's RequestOutputs (chat and completions, whole
and streamed), with usage counts and logprobs in each API's own shape."""
from __future__ import annotations

import json


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class UsageSoFar:
    """Tokens generated so far by each of a request's n samples: with stream_options'
    continuous_usage_stats, every chunk carries the usage up to it."""

    def __init__(self, prompt_tokens: int, n: int, on: bool):
        self.prompt_tokens, self.on, self.done = prompt_tokens * n, on, [0] * n

    def add(self, i: int, out) -> None:
        self.done[i] = len(out.token_ids)

    def stamp(self, chunk: dict) -> dict:
        if self.on:
            chunk["usage"] = usage(self.prompt_tokens, sum(self.done))
        return chunk


def _token(tok, token_id: int) -> str:
    return tok.decode([token_id], skip_special_tokens=False)


def chat_logprobs(out, tok, token_ids: list[int]) -> dict | None:
    """{"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]} for the last len(token_ids) tokens."""
    if out.logprobs is None:
        return None
    entries = out.logprobs[len(out.logprobs) - len(token_ids):] if token_ids else []
    content = []
    for entry in entries:
        (tid, lp), alts = entry[0], entry[1:]
        t = _token(tok, tid)
        content.append({"token": t, "logprob": lp, "bytes": list(t.encode()),
                        "top_logprobs": [{"token": _token(tok, a), "logprob": alp, "bytes": list(_token(tok, a).encode())}
                                         for a, alp in alts]})
    return {"content": content}


def completion_logprobs(out, tok, token_ids: list[int], offset: int = 0) -> dict | None:
    if out.logprobs is None:
        return None
    entries = out.logprobs[len(out.logprobs) - len(token_ids):] if token_ids else []
    tokens, lps, tops, offsets = [], [], [], []
    for entry in entries:
        (tid, lp), alts = entry[0], entry[1:]
        t = _token(tok, tid)
        offsets.append(offset)
        offset += len(t)
        tokens.append(t)
        lps.append(lp)
        tops.append({_token(tok, a): alp for a, alp in alts})
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_chunk(rid: str, created: int, model: str, index: int, delta: dict, finish: str | None = None,
               logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}


def chat_message(out, tool_mode) -> tuple[dict, str]:
    """A finished answer as the assistant message (content and/or tool_calls) and its finish_reason."""
    content, calls = tool_mode.parse(out.text, out.finish_reason)
    message = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    return message, ("tool_calls" if calls else out.finish_reason)


def answer_delta(content: str | None, calls: list[dict] | None) -> dict:
    """A whole answer as one streamed delta: its content, and its tool calls each with its index."""
    delta = {"content": content} if content else {}
    if calls:
        delta["tool_calls"] = [{"index": k, **c} for k, c in enumerate(calls)]
    return delta


def chat_response(rid: str, created: int, model: str, outs: list, prompt_tokens: int, tok, logprobs: bool,
                  tool_mode) -> dict:
    choices = []
    for i, o in enumerate(outs):
        message, finish = chat_message(o, tool_mode)
        choices.append({"index": i, "message": message, "finish_reason": finish,
                        "logprobs": chat_logprobs(o, tok, o.token_ids) if logprobs else None})
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": usage(prompt_tokens * len(outs), sum(len(o.token_ids) for o in outs))}


def completion_chunk(rid: str, created: int, model: str, index: int, text: str, finish: str | None,
                     logprobs: dict | None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}


def completion_response(rid: str, created: int, model: str, outs: list, prompt_tokens: int, tok, logprobs: bool,
                        echo: str = "") -> dict:
    choices = [{"index": i, "text": echo + o.text,
                "logprobs": completion_logprobs(o, tok, o.token_ids, len(echo)) if logprobs else None,
                "finish_reason": o.finish_reason} for i, o in enumerate(outs)]
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": usage(prompt_tokens * len(outs), sum(len(o.token_ids) for o in outs))}
