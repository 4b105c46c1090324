"""What load tests stand on: `lowbit serve --dummy-weights --arch NAME` (no checkpoint), /health
that answers 503 "starting" until the engine has warmed up, and streams that send every token
ready in one chunk. Real servers on 127.0.0.1, called with the official `openai` client and httpx."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from conftest import run_cli
from serve_helpers import free_port, lowbit_server, wait_up

CHAT = [{"role": "user", "content": "hello"}]
PROMPT_BYTES = len("user: hello\nassistant: ")  # the byte tokenizer's chat form (lowbit/serve/dummy_text.py)


@pytest.fixture(scope="module")
def dummy_server():
    with lowbit_server("--dummy-weights", "--arch", "tiny", "--max-model-len", "256", model="") as url:
        yield url


def test_dummy_weights_serve_chat_streams_to_the_openai_client(dummy_server):
    health = httpx.get(f"{dummy_server}/health").json()
    assert health["status"] == "ok" and health["warmup_s"] > 0  # warmed up before it said ok
    client = openai.OpenAI(base_url=f"{dummy_server}/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == ["dummy-tiny"]
    chunks = list(client.chat.completions.create(model="dummy-tiny", messages=CHAT, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    ids = [int(t) for t in text.split()]  # dummy weights have no vocabulary: tokens come back as ids
    assert len(ids) == 8 and all(0 <= t < 512 for t in ids)
    assert chunks[-1].usage.prompt_tokens == PROMPT_BYTES and chunks[-1].usage.completion_tokens == 8

    # a burst of streams at once, each answered in full (no end-of-sequence token: all run to max_tokens)
    def one(i):
        r = client.chat.completions.create(model="dummy-tiny", messages=[{"role": "user", "content": f"n {i}"}],
                                           max_tokens=6, temperature=0)
        return r.choices[0].finish_reason, r.usage.completion_tokens
    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(one, range(16))) == [("length", 6)] * 16


def test_arch_without_dummy_weights_is_one_line():
    r = run_cli("serve", "--arch", "tiny", "--port", str(free_port()), timeout=120)
    assert r.returncode == 2 and "add --dummy-weights" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_health_says_starting_with_503_until_the_engine_has_warmed_up():
    """The engine's lock is held, so its warm-up cannot run: /health answers 503 "starting" and a
    request waits; once the lock is free the warm-up runs, /health turns 200 and the request is answered."""
    import uvicorn

    from lowbit.engine.llm import LLM
    from lowbit.loading.dummy import build_dummy_model
    from lowbit.serve.api_server import build_app
    from lowbit.serve.dummy_text import ByteChatTokenizer
    from lowbit.serve.serving import OpenAIServer

    net, tok, ckpt = build_dummy_model("tiny", device="cpu")
    llm = LLM((net, ByteChatTokenizer(tok.vocab_size), ckpt), max_model_len=128, num_kv_blocks=64)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    llm.engine.lock.acquire()
    held, uv = True, None
    try:
        server = OpenAIServer(llm.start_async(warm_up=True), llm.tokenizer, "dummy-tiny")
        uv = uvicorn.Server(uvicorn.Config(build_app(server), host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=uv.run, daemon=True).start()
        r = None
        for _ in range(100):  # until it listens
            try:
                r = httpx.get(f"{url}/health", timeout=5)
                break
            except httpx.TransportError:
                threading.Event().wait(0.1)
        assert r is not None and r.status_code == 503 and r.json()["status"] == "starting", r
        with ThreadPoolExecutor(1) as pool:
            early = pool.submit(httpx.post, f"{url}/v1/chat/completions", timeout=60,
                                json={"model": "dummy-tiny", "messages": CHAT, "max_tokens": 3})
            threading.Event().wait(0.3)
            assert not early.done()  # queued behind the warm-up
            llm.engine.lock.release()
            held = False
            wait_up(url, timeout=30)
            answer = early.result()
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3
        assert httpx.get(f"{url}/health").json()["warmup_s"] > 0
    finally:
        if held:
            llm.engine.lock.release()
        if uv is not None:
            uv.should_exit = True
        llm.shutdown()


def test_outputs_that_pile_up_go_out_as_one_output():
    """While the event loop is busy, a stream's outputs of several steps wait; the reader gets
    them as one output whose deltas hold them all (one SSE write for all ready tokens)."""
    from lowbit.engine.async_engine import _Stream
    from lowbit.engine.detokenizer import Detokenizer
    from lowbit.engine.outputs import RequestOutput
    from lowbit.engine.sampling_params import SamplingParams
    from lowbit.serve.dummy_text import ByteChatTokenizer

    stream = _Stream(Detokenizer(ByteChatTokenizer(512), SamplingParams(), [1, 2]))
    for ids, finished in (([5], False), ([5, 6], False), ([5, 6, 7], True)):
        stream.feed(RequestOutput("r", None, [1, 2], token_ids=ids, delta_token_ids=ids[-1:], finished=finished,
                                  finish_reason="length" if finished else None))
    out = stream.take()
    assert out.delta_token_ids == [5, 6, 7] and out.delta_text == " 5 6 7" and out.finished
    assert not stream.ready
