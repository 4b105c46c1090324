"""The OpenAI-compatible server, as users reach it: `lowbit serve` in its own process on
127.0.0.1, called with the official `openai` client, raw HTTP and `lowbit chat --url`."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import run_cli

openai = pytest.importorskip("openai")

GREEDY = {"temperature": 0.0, "max_tokens": 24}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, proc=None, timeout: float = 180) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.5)
    raise RuntimeError("server did not come up")


@pytest.fixture(scope="module")
def server():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "lowbit.cli", "serve", "default", "--port", str(port), "--ui",
                             "--max-batch-size", "32"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_up(url, proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and line[0] != "#"}


def test_models_chat_stream_and_usage(client, model_id, smol):
    _, tok, _ = smol
    assert model_id == "SmolLM2-135M-Instruct.Q4_1"
    whole = client.chat.completions.create(model=model_id, messages=QUESTION, **GREEDY)
    text = whole.choices[0].message.content
    assert "Paris" in text and whole.choices[0].finish_reason == "stop"
    assert whole.usage.prompt_tokens == len(tok.encode_chat(QUESTION))
    assert whole.usage.completion_tokens == len(tok.encode(text, add_special_tokens=False))
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    chunks = list(client.chat.completions.create(model=model_id, messages=QUESTION, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completion_stop_n_seed_logprobs(client, model_id, smol):
    _, tok, _ = smol
    prompt = "The capital of France is"
    c = client.completions.create(model=model_id, prompt=prompt, max_tokens=8, temperature=0)
    assert c.choices[0].finish_reason == "length" and c.usage.completion_tokens == 8
    assert c.usage.prompt_tokens == len(tok.encode(prompt))
    assert c.choices[0].text.strip()

    cut = client.chat.completions.create(model=model_id, messages=QUESTION, stop=["Paris"], **GREEDY)
    assert "Paris" not in cut.choices[0].message.content and cut.choices[0].finish_reason == "stop"

    two = client.chat.completions.create(model=model_id, messages=QUESTION, n=2, seed=7, temperature=1.0, max_tokens=12)
    again = client.chat.completions.create(model=model_id, messages=QUESTION, n=2, seed=7, temperature=1.0,
                                           max_tokens=12)
    assert len(two.choices) == 2 and [ch.index for ch in two.choices] == [0, 1]
    assert [ch.message.content for ch in two.choices] == [ch.message.content for ch in again.choices]

    lp = client.chat.completions.create(model=model_id, messages=QUESTION, logprobs=True, top_logprobs=2, **GREEDY)
    content = lp.choices[0].logprobs.content
    assert len(content) == lp.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        # greedy: the sampled token is the most likely one
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-4)


def _stream_text(url: str, model: str, prompt: str, max_tokens: int) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
            "temperature": 0, "max_tokens": max_tokens}
    text = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                for ch in json.loads(line[5:])["choices"]:
                    text.append(ch["delta"].get("content") or "")
    return "".join(text)


def test_sixteen_concurrent_streams_and_a_client_that_leaves(server, client, model_id):
    prompts = [f"Write one sentence about the number {i}." for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        expected = list(pool.map(lambda p: client.chat.completions.create(
            model=model_id, messages=[{"role": "user", "content": p}], temperature=0, max_tokens=16
        ).choices[0].message.content, prompts))

    def leaver():
        # asks for a long answer, reads a few chunks, then drops the connection
        body = {"model": model_id, "messages": QUESTION, "stream": True, "max_tokens": 4000, "temperature": 0.8,
                "seed": 1}
        with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=300) as r:
            for i, _line in enumerate(r.iter_lines()):
                if i > 6:
                    break

    with ThreadPoolExecutor(17) as pool:
        gone = pool.submit(leaver)
        got = list(pool.map(lambda p: _stream_text(server, model_id, p, 16), prompts))
        gone.result()
    assert got == expected
    assert all(t.strip() for t in got)
    # the engine aborted the departed request: nothing runs or waits, no KV block stays in use
    deadline = time.time() + 30
    while time.time() < deadline:
        m = metrics(server)
        if m["lowbit_requests_running"] == 0 and m["lowbit_kv_blocks_used"] == 0:
            break
        time.sleep(0.5)
    assert m["lowbit_requests_running"] == 0 and m["lowbit_requests_waiting"] == 0 and m["lowbit_kv_blocks_used"] == 0
    assert m["lowbit_generation_tokens_total"] >= 16 * 2


MALFORMED = [
    # (method, path, body (dict -> JSON, str -> raw), status, words the message must hold)
    ("POST", "/v1/chat/completions", "{not json", 400, "not valid JSON"),
    ("POST", "/v1/chat/completions", "", 400, "body"),
    ("POST", "/v1/chat/completions", "[1, 2]", 400, ""),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ("POST", "/v1/chat/completions", {"model": "MODEL"}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"model": "MODEL", "messages": []}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"model": "MODEL", "messages": "hi"}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"model": "MODEL", "messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ("POST", "/v1/chat/completions", {"model": "MODEL", "messages": [{"role": "user"}]}, 400, "content"),
    ("POST", "/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "nope"),
    ("POST", "/v1/chat/completions", {"model": "MODEL", "messages": [{"role": "user", "content": "x"}],
                                      "temperature": "hot"}, 400, "temperature"),
    ("POST", "/v1/chat/completions", {"model": "MODEL", "messages": [{"role": "user", "content": "x"}],
                                      "temperature": 5}, 400, "temperature"),
    ("POST", "/v1/chat/completions", {"model": "MODEL", "messages": [{"role": "user", "content": "x"}],
                                      "top_p": 0}, 400, "top_p"),
    ("POST", "/v1/chat/completions", {"model": "MODEL", "messages": [{"role": "user", "content": "x"}],
                                      "max_tokens": 0}, 400, "max_tokens"),
    ("POST", "/v1/chat/completions", {"model": "MODEL", "messages": [{"role": "user", "content": "x"}],
                                      "max_tokens": 10 ** 6}, 400, "exceeds the context"),
    ("POST", "/v1/chat/completions", {"model": "MODEL", "messages": [{"role": "user", "content": "x"}],
                                      "n": 0}, 400, "n"),
    ("POST", "/v1/chat/completions", {"model": "MODEL", "messages": [{"role": "user", "content": "x"}],
                                      "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("POST", "/v1/chat/completions", {"model": "MODEL", "messages": [{"role": "user", "content": "x"}],
                                      "presence_penalty": 3}, 400, "presence_penalty"),
    ("POST", "/v1/chat/completions", {"model": "MODEL", "messages": [{"role": "user", "content": "x"}],
                                      "top_logprobs": 3}, 400, "logprobs"),
    ("POST", "/v1/chat/completions", {"model": "MODEL", "messages": [{"role": "user", "content": "x"}],
                                      "frobnicate": True}, 400, "frobnicate"),
    ("POST", "/v1/completions", {"model": "MODEL"}, 400, "prompt"),
    ("POST", "/v1/completions", {"model": "MODEL", "prompt": []}, 400, "prompt"),
    ("POST", "/v1/completions", {"model": "MODEL", "prompt": [-5, 3]}, 400, "token ids"),
    ("POST", "/v1/completions", {"model": "MODEL", "prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("POST", "/v1/completions", {"model": "MODEL", "prompt": "x " * 9000}, 400, "context"),
    ("GET", "/v1/chat/completions", None, 405, "not allowed"),
    ("GET", "/v1/nothing-here", None, 404, "no route"),
]


def test_malformed_requests_get_clear_errors_and_the_server_stays_up(server, client, model_id):
    assert len(MALFORMED) >= 20
    for method, path, body, status, words in MALFORMED:
        if isinstance(body, dict):
            body = json.dumps(body).replace('"MODEL"', json.dumps(model_id))
        r = httpx.request(method, f"{server}{path}", content=body, headers={"Content-Type": "application/json"},
                          timeout=60)
        assert r.status_code == status, (path, body, r.text)
        err = r.json()["error"]
        assert err["message"] and words.lower() in err["message"].lower(), (body, err)
        assert set(err) == {"message", "type", "param", "code"}
    ok = client.chat.completions.create(model=model_id, messages=QUESTION, **GREEDY)
    assert "Paris" in ok.choices[0].message.content


def test_api_key_and_overload(smol):
    """A second server in this process, on the same weights: the key is checked; a full queue is refused."""
    import uvicorn

    from lowbit.engine.llm import LLM
    from lowbit.serve.api_server import OpenAIServer, build_app

    llm = LLM(smol, max_batch_size=4, max_model_len=1024, num_kv_blocks=64)
    port = free_port()
    srv = OpenAIServer(llm.async_engine, llm.tokenizer, "smol", api_key="sekrit")
    busy = OpenAIServer(llm.async_engine, llm.tokenizer, "smol", max_waiting=0)  # always "full"
    app = build_app(srv)
    app.mount("/busy", build_app(busy))
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=uv.run, daemon=True)
    th.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_up(url)
        body = {"model": "smol", "messages": QUESTION, "max_tokens": 4}
        r = httpx.post(f"{url}/v1/chat/completions", json=body)
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        r = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and "not valid" in r.json()["error"]["message"]
        r = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer sekrit"})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
        r = httpx.post(f"{url}/busy/v1/chat/completions", json=body)
        assert r.status_code == 429 and "overloaded" in r.json()["error"]["message"]
    finally:
        uv.should_exit = True
        th.join(timeout=10)
        llm.shutdown()


def test_chat_cli_against_the_server(server):
    r = run_cli("chat", "--url", server, "--temperature", "0", "--max-new-tokens", "24",
                input="What is the capital of France?\n/reset\n/exit\n", timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and "(conversation cleared)" in r.stdout


def test_chat_cli_unreachable_server_is_one_line():
    r = run_cli("chat", "--url", f"http://127.0.0.1:{free_port()}", input="/exit\n")
    assert r.returncode == 2 and "cannot reach the server" in r.stderr and "Traceback" not in r.stderr


def test_bench_serve(server, tmp_path):
    r = run_cli("bench", "serve", "--url", server, "--num-prompts", "4", "--concurrency", "2", "--max-tokens", "8",
                "--out", str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "bench_serve.json").read_text())
    assert rec["completed"] == 4 and rec["failed"] == 0 and rec["output_tokens"] == 4 * 8
    assert rec["ttft_ms"]["n"] == 4 and rec["ttft_ms"]["p50"] > 0 and rec["itl_ms"]["n"] > 0
    assert rec["requests_per_s"] > 0


def _chromium() -> str | None:
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_web_page_streams_a_reply_in_a_real_browser(server, model_id):
    """Headless Chromium opens the chat page, sends a message and shows the streamed reply."""
    sync_api = pytest.importorskip("playwright.sync_api")
    exe = _chromium()
    assert exe, "chromium is missing: scripts/setup.sh installs Debian's chromium for the tests"
    artifacts = os.path.join(os.path.dirname(__file__), "..", "test-artifacts")
    os.makedirs(artifacts, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.goto(server + "/")
            sync_api.expect(page.locator("#model")).to_have_text(model_id, timeout=30_000)
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "32")
            page.fill("#input", "What is the capital of France?")
            page.click("#send")
            reply = page.locator(".msg.assistant").last
            sync_api.expect(reply).to_have_attribute("data-state", "done", timeout=120_000)
            assert "Paris" in reply.inner_text()
            assert page.locator(".msg.user").last.inner_text() == "What is the capital of France?"
            assert "tokens in" in page.locator("#stats").inner_text()
            page.screenshot(path=os.path.join(artifacts, "webui_chat.png"))
            page.click("#reset")
            assert page.locator(".msg").count() == 0
        finally:
            browser.close()
