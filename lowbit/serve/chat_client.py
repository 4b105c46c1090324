"""The client side of `lowbit chat --url` and `lowbit bench serve`: a model name from
/v1/models and streamed chat completions, read as server-sent events."""
from __future__ import annotations

import json
from typing import Iterator

import httpx

from lowbit.errors import LowbitError


def _headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _error(url: str, r: httpx.Response) -> LowbitError:
    try:
        msg = r.json()["error"]["message"]
    except Exception:
        msg = r.text[:200]
    return LowbitError(f"{url}: HTTP {r.status_code}: {msg}")


def model_name(url: str, api_key: str | None = None, timeout: float = 10) -> str:
    base = url.rstrip("/")
    try:
        r = httpx.get(f"{base}/v1/models", headers=_headers(api_key), timeout=timeout)
    except httpx.HTTPError as e:
        raise LowbitError(f"{base}: cannot reach the server ({e})") from None
    if r.status_code != 200:
        raise _error(base, r)
    return r.json()["data"][0]["id"]


def stream_chat(url: str, model: str, messages: list[dict], api_key: str | None = None, timeout: float = 600,
                **sampling) -> Iterator[dict]:
    """Yields each SSE chunk (parsed JSON) of a streamed chat completion, the usage chunk included."""
    base = url.rstrip("/")
    body = {"model": model, "messages": messages, "stream": True, "stream_options": {"include_usage": True},
            **{k: v for k, v in sampling.items() if v is not None}}
    try:
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, headers=_headers(api_key),
                          timeout=timeout) as r:
            if r.status_code != 200:
                r.read()
                raise _error(base, r)
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise LowbitError(f"{base}: {chunk['error']['message']}")
                yield chunk
    except httpx.HTTPError as e:
        raise LowbitError(f"{base}: request failed ({e})") from None


def chunk_text(chunk: dict) -> str:
    return "".join((c.get("delta") or {}).get("content") or "" for c in chunk.get("choices", []))
