"""The OpenAI-compatible server, as users reach it: `lowbit serve default` in its own process on
127.0.0.1 (one for the whole module), called with the official `openai` client, raw HTTP,
`lowbit chat --url`, `lowbit bench serve` and a real headless browser."""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai  # a test dependency: a missing one fails the module, as a broken install should
import pytest

from conftest import run_cli
from serve_helpers import (free_port, lowbit_server, metrics, start_streaming_client, stream_text, wait_metrics,
                           wait_up)

GREEDY = {"temperature": 0.0, "max_tokens": 24}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
LONG = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]
ARTIFACTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "test-artifacts")  # git-ignored

ABORTS = 'lowbit_requests_finished_total{reason="abort"}'


@pytest.fixture(scope="module")
def server(request):
    # the tests' own copy of the model (for the tokenizer and reference answers) loads meanwhile
    with lowbit_server("--ui", "--max-batch-size", "32", while_it_loads=lambda: request.getfixturevalue("smol")) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


def _idle(m: dict) -> bool:
    return m["lowbit_requests_running"] == 0 and m["lowbit_requests_waiting"] == 0 and m["lowbit_kv_blocks_used"] == 0


def test_models_chat_stream_and_usage(client, model_id, smol):
    _, tok, _ = smol
    models = client.models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct.Q4_1"] and models[0].owned_by == "lowbit"
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
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()

    # max_completion_tokens (the newer name) caps the answer: finish_reason "length"
    short = client.chat.completions.create(model=model_id, messages=QUESTION, temperature=0, max_completion_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    assert text.startswith(short.choices[0].message.content)


def test_continuous_usage_stats_count_up_on_every_chunk(client, model_id, smol):
    _, tok, _ = smol
    prompt_tokens = len(tok.encode_chat(QUESTION))
    chunks = list(client.chat.completions.create(
        model=model_id, messages=QUESTION, stream=True, max_tokens=6, temperature=0,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert all(c.usage is not None and c.usage.prompt_tokens == prompt_tokens for c in chunks)
    done = [c.usage.completion_tokens for c in chunks]
    assert done == sorted(done) and done[0] == 0 and done[-1] == 6
    assert all(c.usage.total_tokens == prompt_tokens + c.usage.completion_tokens for c in chunks)
    plain = list(client.completions.create(model=model_id, prompt="The capital of France is", max_tokens=4,
                                           temperature=0, stream=True, stream_options={"continuous_usage_stats": True}))
    assert [c.usage.completion_tokens for c in plain][-1] == 4 and all(c.usage for c in plain)
    assert all(c.choices for c in plain)  # no usage-only last chunk without include_usage


def test_logit_bias_bans_and_forces_tokens(client, model_id, smol):
    _, tok, _ = smol
    plain = client.chat.completions.create(model=model_id, messages=QUESTION, temperature=0, max_tokens=3)
    first = tok.encode(plain.choices[0].message.content, add_special_tokens=False)[0]
    banned = client.chat.completions.create(model=model_id, messages=QUESTION, temperature=0, max_tokens=3,
                                            logit_bias={str(first): -100})
    assert tok.encode(banned.choices[0].message.content, add_special_tokens=False)[0] != first
    forced_id = tok.encode(" banana", add_special_tokens=False)[0]
    forced = client.completions.create(model=model_id, prompt="The capital of France is", max_tokens=3,
                                       temperature=0.7, seed=1, logit_bias={str(forced_id): 100})
    assert forced.choices[0].text == tok.decode([forced_id] * 3)
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.chat.completions.create(model=model_id, messages=QUESTION, max_tokens=3, logit_bias={"-5": 1})
    with pytest.raises(openai.BadRequestError, match=r"outside \[-100, 100\]"):
        client.chat.completions.create(model=model_id, messages=QUESTION, max_tokens=3, logit_bias={"5": 300})


def test_response_format_json_schema_object_and_guided_choice(client, model_id):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                               "capital": {"type": "boolean"}},
              "required": ["city", "capital"], "additionalProperties": False}
    ask = [{"role": "user", "content": "Is Paris a capital city? Answer in JSON with city and capital."}]
    rf = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}}
    whole = client.chat.completions.create(model=model_id, messages=ask, temperature=0, max_tokens=40,
                                           response_format=rf)
    obj = json.loads(whole.choices[0].message.content)
    assert set(obj) == {"city", "capital"} and isinstance(obj["capital"], bool) and whole.choices[0].finish_reason == "stop"
    # streamed json_object: the chunks together are one JSON object
    chunks = list(client.chat.completions.create(model=model_id, messages=ask, temperature=0, max_tokens=60,
                                                 stream=True, response_format={"type": "json_object"}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert isinstance(json.loads(text), dict)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    # vLLM's guided_choice through extra_body, on the completions API
    pick = client.completions.create(model=model_id, prompt="Is Paris in France? Answer:", max_tokens=4, temperature=0,
                                     extra_body={"guided_choice": ["yes", "no"]})
    assert pick.choices[0].text in ("yes", "no")
    with pytest.raises(openai.BadRequestError, match="unclosed group"):
        client.completions.create(model=model_id, prompt="x", max_tokens=4, extra_body={"guided_regex": "("})
    with pytest.raises(openai.BadRequestError, match="json_schema.schema"):
        client.chat.completions.create(model=model_id, messages=ask, max_tokens=4,
                                       response_format={"type": "json_schema", "json_schema": {"name": "x"}})


def test_tool_calls_named_required_streamed_and_a_tool_turn(client, model_id):
    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                        "unit": {"enum": ["celsius", "fahrenheit"]}},
                       "required": ["city", "unit"], "additionalProperties": False}}}
    clock = {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}}}
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    named = client.chat.completions.create(model=model_id, messages=ask, tools=[weather, clock], temperature=0,
                                           max_tokens=40, tool_choice={"type": "function",
                                                                       "function": {"name": "get_weather"}})
    choice = named.choices[0]
    call = choice.message.tool_calls[0]
    args = json.loads(call.function.arguments)
    assert choice.finish_reason == "tool_calls" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit")

    required = client.chat.completions.create(model=model_id, messages=ask, tools=[weather, clock], temperature=0,
                                              max_tokens=60, tool_choice="required", parallel_tool_calls=False)
    calls = required.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name in ("get_weather", "get_time")
    json.loads(calls[0].function.arguments)

    # streamed: the call's id and name first, then its arguments piece by piece, as OpenAI streams
    # them; joined, the pieces are the whole answer's arguments; then finish_reason tool_calls
    chunks = list(client.chat.completions.create(model=model_id, messages=ask, tools=[weather], temperature=0,
                                                 max_tokens=40, stream=True, tool_choice={
                                                     "type": "function", "function": {"name": "get_weather"}}))
    deltas = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(deltas) > 2 and all(d.index == 0 for d in deltas)
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather"
    assert all(d.id is None and d.function.name is None for d in deltas[1:])
    assert json.loads("".join(d.function.arguments for d in deltas)) == args
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]

    # "auto" (the default with tools) streams the answer as it comes: the default model's template
    # defines no tools, so it answers in text, the same text as unstreamed, in many pieces
    whole = client.chat.completions.create(model=model_id, messages=ask, tools=[weather], temperature=0, max_tokens=24)
    texts = [c.choices[0].delta.content for c in client.chat.completions.create(
        model=model_id, messages=ask, tools=[weather], temperature=0, max_tokens=24, stream=True)
        if c.choices and c.choices[0].delta.content]
    assert len(texts) > 1 and "".join(texts) == whole.choices[0].message.content

    # the conversation goes on with the tool's answer
    turn = ask + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                  {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"}]
    reply = client.chat.completions.create(model=model_id, messages=turn, tools=[weather], temperature=0, max_tokens=16)
    assert reply.choices[0].message.content and reply.choices[0].finish_reason in ("stop", "length")


def test_completion_stop_n_seed_penalties_logprobs(client, model_id, smol):
    _, tok, _ = smol
    prompt = "The capital of France is"
    c = client.completions.create(model=model_id, prompt=prompt, max_tokens=8, temperature=0)
    assert c.choices[0].finish_reason == "length" and c.usage.completion_tokens == 8
    assert c.usage.prompt_tokens == len(tok.encode(prompt))
    assert c.usage.completion_tokens == len(tok.encode(c.choices[0].text, add_special_tokens=False))
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model=model_id, prompt=prompt, max_tokens=8, temperature=0, stream=True) if ch.choices)
    assert streamed == c.choices[0].text

    cut = client.chat.completions.create(model=model_id, messages=QUESTION, stop=["Paris"], **GREEDY)
    assert "Paris" not in cut.choices[0].message.content and cut.choices[0].finish_reason == "stop"

    sampled = dict(model=model_id, messages=QUESTION, n=2, seed=7, temperature=1.0, top_p=0.95, max_tokens=12)
    two, same = client.chat.completions.create(**sampled), client.chat.completions.create(**sampled)
    assert len(two.choices) == 2 and [ch.index for ch in two.choices] == [0, 1]
    assert [ch.message.content for ch in two.choices] == [ch.message.content for ch in same.choices]
    assert two.usage.prompt_tokens == 2 * len(tok.encode_chat(QUESTION))

    echo = dict(model=model_id, messages=[{"role": "user", "content": "Repeat the word hello ten times."}],
                temperature=0, max_tokens=12)
    plain = client.chat.completions.create(**echo).choices[0].message.content.lower()
    penalised = client.chat.completions.create(**echo, frequency_penalty=2.0, presence_penalty=2.0)
    assert plain.count("hello") > penalised.choices[0].message.content.lower().count("hello") >= 1, (plain, penalised)

    lp = client.chat.completions.create(model=model_id, messages=QUESTION, logprobs=True, top_logprobs=2, **GREEDY)
    content = lp.choices[0].logprobs.content
    assert len(content) == lp.usage.completion_tokens
    assert "".join(e.token for e in content).strip() == lp.choices[0].message.content.strip()
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        # greedy: the sampled token is the most likely one
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-4)
    clp = client.completions.create(model=model_id, prompt=prompt, max_tokens=4, temperature=0, logprobs=3)
    assert len(clp.choices[0].logprobs.tokens) == 4 and all(len(t) == 3 for t in clp.choices[0].logprobs.top_logprobs)


def test_sixteen_concurrent_streams_and_a_killed_client(server, model_id, smol):
    """16 streams at once each get their own greedy answer (the offline engine's, in this
    process: batched greedy equals each prompt alone, test_engine_llm), while a client process
    killed mid-stream has its sequence aborted and its blocks freed."""
    from lowbit.engine.llm import LLM
    from lowbit.engine.sampling_params import SamplingParams

    prompts = [f"Write one sentence about the number {i}." for i in range(16)]
    offline = LLM(smol, max_model_len=512, num_kv_blocks=128, max_batch_size=16)
    alone = [o.text for o in offline.chat([[{"role": "user", "content": p}] for p in prompts],
                                          SamplingParams(max_tokens=16, temperature=0))]
    aborts_before = metrics(server).get(ABORTS, 0)

    victim = start_streaming_client(server, {"model": model_id, "messages": LONG, "max_tokens": 4000,
                                             "temperature": 0})
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(stream_text, server, {"model": model_id, "messages": [{"role": "user", "content": p}],
                                                     "temperature": 0, "max_tokens": 16}) for p in prompts]
        seen = []
        while len([s for s in seen if '"content"' in s]) < 4:  # the role chunk, then a few tokens
            seen.append(victim.stdout.readline())
            assert seen[-1], "the streaming client ended before it was killed"
        victim.kill()
        victim.wait()
        got = [f.result() for f in futures]
    assert not any('"finish_reason": "' in s for s in seen)  # it was killed while its answer ran
    assert [text for text, _ in got] == alone
    assert all(reasons and reasons[0] in ("stop", "length") for _, reasons in got)
    assert all(text.strip() for text in alone)

    m = wait_metrics(server, _idle)
    assert _idle(m), m
    assert m[ABORTS] == aborts_before + 1
    assert m["lowbit_generation_tokens_total"] >= 16 * 2
    assert m["lowbit_kv_blocks_total"] > 0


def test_a_non_streamed_request_whose_client_leaves_is_aborted(server, model_id):
    before = metrics(server).get(ABORTS, 0)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server}/v1/chat/completions", timeout=2,
                   json={"model": model_id, "messages": LONG, "max_tokens": 4000, "temperature": 0})
    m = wait_metrics(server, lambda m: _idle(m) and m.get(ABORTS, 0) > before)
    assert _idle(m) and m[ABORTS] == before + 1, m


MALFORMED = [
    # (method, path, body (dict -> JSON, str -> raw), status, words the message must hold)
    ("POST", "/v1/chat/completions", "{not json", 400, "not valid JSON"),
    ("POST", "/v1/chat/completions", "", 400, "body"),
    ("POST", "/v1/chat/completions", "[1, 2]", 400, "body"),
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
                                      "max_tokens": 10 ** 6}, 400, "+ max_tokens (1000000) = "),
    ("POST", "/v1/chat/completions", {"model": "MODEL", "messages": [{"role": "user", "content": "x"}],
                                      "max_tokens": 2.5}, 400, "max_tokens"),
    ("POST", "/v1/chat/completions", {"model": "MODEL", "messages": [{"role": "user", "content": "x"}],
                                      "n": 0}, 400, "n"),
    ("POST", "/v1/chat/completions", {"model": "MODEL", "messages": [{"role": "user", "content": "x"}],
                                      "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("POST", "/v1/chat/completions", {"model": "MODEL", "messages": [{"role": "user", "content": "x"}],
                                      "presence_penalty": 3}, 400, "presence_penalty"),
    ("POST", "/v1/chat/completions", {"model": "MODEL", "messages": [{"role": "user", "content": "x"}],
                                      "top_logprobs": 3}, 400, "logprobs"),
    ("POST", "/v1/chat/completions", {"model": "MODEL", "messages": [{"role": "user", "content": "x"}],
                                      "stream_options": {"include_usage": True}}, 400, "stream"),
    ("POST", "/v1/chat/completions", {"model": "MODEL", "messages": [{"role": "user", "content": "x"}],
                                      "frobnicate": True}, 400, "frobnicate"),
    ("POST", "/v1/completions", {"model": "MODEL"}, 400, "prompt"),
    ("POST", "/v1/completions", {"model": "MODEL", "prompt": []}, 400, "prompt"),
    ("POST", "/v1/completions", {"model": "MODEL", "prompt": [-5, 3]}, 400, "token ids"),
    ("POST", "/v1/completions", {"model": "MODEL", "prompt": ["a", "b"]}, 400, "one prompt"),
    ("POST", "/v1/completions", {"model": "MODEL", "prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("POST", "/v1/completions", {"model": "MODEL", "prompt": "x " * 9000}, 400, "context"),
    ("POST", "/v1/completions", {"model": "other", "prompt": "x"}, 404, "does not exist"),
    ("GET", "/v1/chat/completions", None, 405, "not allowed"),
    ("GET", "/v1/nothing-here", None, 404, "no route"),
]


def test_malformed_requests_get_clear_errors_and_disturb_no_one(server, client, model_id):
    """The table is sent while a good request streams; each gets its status and a message that
    names the problem, and the good request finishes with its greedy answer."""
    assert len(MALFORMED) >= 20
    body = {"model": model_id, "messages": QUESTION, "temperature": 0, "max_tokens": 24}
    expected = client.chat.completions.create(**body).choices[0].message.content
    with ThreadPoolExecutor(1) as pool:
        good = pool.submit(stream_text, server, body)
        for method, path, raw, status, words in MALFORMED:
            if isinstance(raw, dict):
                raw = json.dumps(raw).replace('"MODEL"', json.dumps(model_id))
            r = httpx.request(method, f"{server}{path}", content=raw, headers={"Content-Type": "application/json"},
                              timeout=60)
            assert r.status_code == status, (path, raw, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}
            assert err["message"] and words.lower() in err["message"].lower(), (raw, err)
        assert good.result() == (expected, ["stop"])
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    m = wait_metrics(server, _idle)
    assert _idle(m), m


def test_api_key_and_overload(smol):
    """A second server in this process on the same weights (uvicorn in a thread): the key is
    checked, and with one sequence running and one waiting, a third request is refused with 429."""
    import uvicorn

    from lowbit.engine.llm import LLM
    from lowbit.serve.api_server import build_app
    from lowbit.serve.serving import OpenAIServer

    llm = LLM(smol, max_batch_size=1, max_model_len=1024, num_kv_blocks=128)
    keyed = OpenAIServer(llm.async_engine, llm.tokenizer, "smol", api_key="sekrit")
    busy = OpenAIServer(llm.async_engine, llm.tokenizer, "smol", max_waiting=1)
    app = build_app(keyed)
    app.mount("/busy", build_app(busy))
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=uv.run, daemon=True)
    th.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_up(url)
        body = {"model": "smol", "messages": QUESTION, "max_tokens": 4}
        for headers, why in (({}, "no API key given"), ({"Authorization": "Bearer wrong"}, "not valid"),
                             ({"Authorization": "sekrit"}, "not valid")):
            r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers)
            assert r.status_code == 401 and why in r.json()["error"]["message"], r.text
            assert r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200  # liveness needs no key
        r = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer sekrit"})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]

        long = {"model": "smol", "messages": LONG, "max_tokens": 500, "temperature": 0, "stream": True}
        with httpx.Client(timeout=60) as c, c.stream("POST", f"{url}/busy/v1/chat/completions", json=long) as first:
            lines = first.iter_lines()
            while '"content": "' not in (line := next(lines)) or '"role"' in line:  # until it runs
                pass
            with c.stream("POST", f"{url}/busy/v1/chat/completions", json=long) as second:
                assert first.status_code == second.status_code == 200
                r = c.post(f"{url}/busy/v1/chat/completions", json={**long, "stream": False})
                assert r.status_code == 429, r.text
                assert "overloaded" in r.json()["error"]["message"]
                assert "--max-waiting 1" in r.json()["error"]["message"]
        deadline = time.time() + 30  # both streams closed: aborted, the batch empty again
        while busy.live and time.time() < deadline:
            time.sleep(0.1)
        assert not busy.live and busy.stats.requests_total.get("abort") == 2
    finally:
        uv.should_exit = True
        th.join(timeout=10)
        llm.shutdown()


def test_chat_cli_against_the_server(server):
    r = run_cli("chat", "--url", server, "--temperature", "0", "--max-new-tokens", "24",
                input="What is the capital of France?\n/reset\n/exit\n", timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and "(conversation cleared)" in r.stdout


def test_chat_cli_unreachable_server_and_busy_port_are_one_line(server):
    r = run_cli("chat", "--url", f"http://127.0.0.1:{free_port()}", input="/exit\n")
    assert r.returncode == 2 and "cannot reach the server" in r.stderr and "Traceback" not in r.stderr
    port = server.rsplit(":", 1)[1]
    r = run_cli("serve", "default", "--port", port, timeout=120)  # refused before the model loads
    assert r.returncode == 2 and "pick another --port" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_bench_serve(server):
    out = os.path.join(ARTIFACTS, "bench_serve")  # the JSON and the figure, to look at
    r = run_cli("bench", "serve", "--url", server, "--num-prompts", "4", "--concurrency", "2", "--max-tokens", "8",
                "--out", out, timeout=300)
    assert r.returncode == 0, r.stderr
    rec = json.loads(open(os.path.join(out, "bench_serve.json")).read())
    assert rec["completed"] == 4 and rec["failed"] == 0 and rec["output_tokens"] == 4 * 8
    assert rec["dataset"] == "tinyshakespeare" and rec["prompt_tokens"] > 4 * 20
    for key in ("ttft_ms", "itl_ms", "latency_ms"):
        assert set(rec[key]) >= {"p50", "p90", "p99"}
        assert 0 < rec[key]["p50"] <= rec[key]["p90"] <= rec[key]["p99"]
    assert rec["ttft_ms"]["n"] == 4 and rec["itl_ms"]["n"] > 0
    assert rec["requests_per_s"] > 0 and rec["output_tokens_per_s"] > 0
    if rec["png"]:
        assert os.path.getsize(os.path.join(out, "bench_serve.png")) > 10_000


def test_web_page_streams_a_reply_in_a_real_browser(server, model_id):
    """Headless Chromium opens the chat page, sends a message and shows the reply as it streams."""
    sync_api = pytest.importorskip("playwright.sync_api")
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "chromium is missing: `bash scripts/setup.sh test` installs Debian's chromium"
    os.makedirs(ARTIFACTS, exist_ok=True)
    shot = os.path.abspath(os.path.join(ARTIFACTS, "webui_chat.png"))
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.goto(server + "/")
            sync_api.expect(page.locator("#model")).to_have_text(model_id, timeout=30_000)
            # every text the reply bubble shows on its way, to see it grow rather than appear at once
            page.evaluate("""() => { window.seen = [];
                new MutationObserver(() => { const m = document.querySelector('.msg.assistant');
                    if (m && m.textContent && window.seen.at(-1) !== m.textContent) window.seen.push(m.textContent); })
                .observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true}); }""")
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "32")
            page.fill("#input", "What is the capital of France?")
            page.click("#send")
            reply = page.locator(".msg.assistant").last
            sync_api.expect(reply).to_have_attribute("data-state", "done", timeout=120_000)
            text = reply.text_content()
            assert "Paris" in text
            seen = page.evaluate("window.seen")
            assert len(seen) > 2 and seen[-1] == text and all(text.startswith(s) for s in seen), seen
            assert page.locator(".msg.user").last.inner_text() == "What is the capital of France?"
            assert "tokens in" in page.locator("#stats").inner_text()
            page.screenshot(path=shot)
            print(f"screenshot: {shot}")
            page.click("#reset")
            assert page.locator(".msg").count() == 0

            # Reset while a long reply streams: the page drops the connection, the server aborts it
            aborts = metrics(server).get(ABORTS, 0)
            page.fill("#max_tokens", "2000")
            page.fill("#input", LONG[0]["content"])
            page.click("#send")
            page.wait_for_function("() => (document.querySelector('.msg.assistant') || {}).textContent?.length > 10",
                                   timeout=120_000)
            page.click("#reset")
            assert page.locator(".msg").count() == 0
            m = wait_metrics(server, lambda m: _idle(m) and m.get(ABORTS, 0) > aborts)
            assert _idle(m) and m[ABORTS] == aborts + 1, m
        finally:
            browser.close()
