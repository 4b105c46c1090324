"""What the serve tests share: a free port, a `lowbit serve` subprocess, /metrics as numbers, and
a streaming client that runs in a process of its own (so a test can kill it mid-stream)."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, proc: subprocess.Popen | None = None, timeout: float = 240) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(0.2)  # loading, or 503 while the engine warms up
    raise RuntimeError(f"{url} did not come up in {timeout}s")


@contextlib.contextmanager
def lowbit_server(*args: str, while_it_loads=None, model: str = "default"):
    """`lowbit serve MODEL --port P ARGS` in its own process; yields its base URL once /health
    answers 200. while_it_loads() runs meanwhile (e.g. loading the test's own copy of the model)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "lowbit.cli", "serve", *([model] if model else []), "--port", str(port),
                             *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        if while_it_loads is not None:
            while_it_loads()
        wait_up(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def metrics(url: str) -> dict[str, float]:
    """/metrics as {name (with labels): value}; checks the text parses as Prometheus' format."""
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_metrics(url: str, ok, timeout: float = 30) -> dict[str, float]:
    """Polls /metrics until ok(metrics) holds (or the time is up); returns the last reading."""
    deadline = time.time() + timeout
    while True:
        m = metrics(url)
        if ok(m) or time.time() > deadline:
            return m
        time.sleep(0.2)


def stream_text(url: str, body: dict, api_key: str | None = None) -> tuple[str, list[str]]:
    """A streamed chat completion read as raw SSE: (the reassembled text, finish reasons)."""
    text, reasons = [], []
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, headers=headers,
                      timeout=300) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                for ch in json.loads(line[5:])["choices"]:
                    text.append(ch["delta"].get("content") or "")
                    if ch["finish_reason"]:
                        reasons.append(ch["finish_reason"])
    return "".join(text), reasons


# A client in a process of its own: prints each SSE data line as it arrives, so the test can kill
# it (SIGKILL: the OS closes the socket, nothing polite is sent) at a moment it chooses.
_STREAMING_CLIENT = """
import json, sys, httpx
with httpx.stream("POST", sys.argv[1] + "/v1/chat/completions", json=json.loads(sys.argv[2]), timeout=300) as r:
    for line in r.iter_lines():
        if line.startswith("data:"):
            print(line, flush=True)
"""


def start_streaming_client(url: str, body: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _STREAMING_CLIENT, url, json.dumps({**body, "stream": True})],
                            stdout=subprocess.PIPE, text=True)
