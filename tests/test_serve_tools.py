"""Tool calling's request checks and answer parsing, without a server (the served round trips are
in test_serve_api.py): which tool_choice needs what, the grammar a forced call gets, and Hermes-style
calls found in free text."""
import json

import pytest

from lowbit.serve.protocol import ChatCompletionRequest, ErrorResponse

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
MSG = [{"role": "user", "content": "hi"}]


def request(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, **kw})


def test_tool_choice_modes_and_their_grammars():
    assert request().tool_mode.kind == "none" and request().structured_output() is None
    auto = request(tools=[WEATHER, TIME])
    assert auto.tool_mode.kind == "auto" and auto.structured_output() is None
    named = request(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named.structured_output().json_schema == WEATHER["function"]["parameters"]
    required = request(tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    schema = required.structured_output().json_schema
    assert schema["maxItems"] == 1 and [c["properties"]["name"]["const"] for c in schema["items"]["anyOf"]] == \
        ["get_weather", "get_time"]
    # a function without parameters takes an empty object
    assert schema["items"]["anyOf"][1]["properties"]["arguments"]["properties"] == {}


@pytest.mark.parametrize("kw,match", [
    ({"tool_choice": "required"}, "needs tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools"),
    ({"tools": [WEATHER, WEATHER]}, "unique"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "cannot take"),
])
def test_tool_requests_that_do_not_fit_are_400(kw, match):
    with pytest.raises(ErrorResponse, match=match) as e:
        request(**kw).structured_output()
    assert e.value.status == 400 and e.value.param == "tool_choice"


def test_answers_become_tool_calls():
    named = request(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}}).tool_mode
    content, calls = named.parse('{"city":"Paris"}', "stop")
    assert content is None and calls[0]["function"] == {"name": "get_weather", "arguments": '{"city":"Paris"}'}
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"
    assert named.parse('{"city":"Pa', "length") == ('{"city":"Pa', None)  # cut short: stays content

    required = request(tools=[WEATHER, TIME], tool_choice="required").tool_mode
    _, calls = required.parse('[{"name":"get_time","arguments":{}},{"name":"get_weather","arguments":{"city":"Oslo"}}]',
                              "stop")
    assert [c["function"]["name"] for c in calls] == ["get_time", "get_weather"]
    assert json.loads(calls[1]["function"]["arguments"]) == {"city": "Oslo"}

    auto = request(tools=[WEATHER]).tool_mode
    text = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    content, calls = auto.parse(text, "stop")
    assert content == "Let me look." and json.loads(calls[0]["function"]["arguments"]) == {"city": "Rome"}
    assert auto.parse("Just words.", "stop") == ("Just words.", None)
    # a call of an unknown tool, or one that does not parse, is left as text
    bad = '<tool_call>{"name": "launch", "arguments": {}}</tool_call>'
    assert auto.parse(bad, "stop") == (bad, None)
    assert auto.parse("<tool_call>{not json</tool_call>", "stop") == ("<tool_call>{not json</tool_call>", None)
    # Llama 3.1's JSON call (parameters, optionally after <|python_tag|>) and Mistral's [TOOL_CALLS] list
    for text in ('{"name": "get_weather", "parameters": {"city": "Oslo"}}',
                 '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}',
                 '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}}]'):
        content, calls = auto.parse(text, "stop")
        assert content is None and len(calls) == 1, text
        assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    # JSON that is not a call of a given tool stays content
    assert auto.parse('{"city": "Oslo"}', "stop") == ('{"city": "Oslo"}', None)
    assert auto.parse('[1, 2]', "stop") == ('[1, 2]', None)


def test_tool_turns_reach_the_template_as_hf_reads_them():
    req = request(messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}])
    msgs = [m.for_template() for m in req.messages]
    assert msgs[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"} and msgs[1]["content"] == ""
    assert msgs[2] == {"role": "tool", "content": "18 C, sunny", "tool_call_id": "call_1"}


def _streamed(mode, text: str, size: int, finish: str = "stop"):
    """Feeds `text` in pieces of `size` characters -> (content joined, calls, finish_reason, deltas)."""
    from lowbit.serve.tools import StreamedChoice

    choice = StreamedChoice(mode)
    pieces = [text[i:i + size] for i in range(0, len(text), size)] or [""]
    deltas = []
    for k, piece in enumerate(pieces):
        deltas += choice.deltas(piece, finish if k == len(pieces) - 1 else None)
    content = "".join(d.get("content", "") for d in deltas)
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    return content, calls, choice.finish_reason(finish), deltas


def test_auto_answers_stream_as_content_with_calls_whole():
    auto = request(tools=[WEATHER, TIME]).tool_mode
    plain = "Paris is sunny < 30 C today, <b>warm</b>."
    hermes = ('Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call> '
              '<tool_call>{"name": "nope", "arguments": {}}</tool_call>Done.')
    for size in range(1, len(hermes) + 1):
        content, calls, finish, deltas = _streamed(auto, plain, size)
        assert (content, calls, finish) == (plain, [], "stop")
        if size < len(plain) // 2:
            assert len(deltas) > 1  # text goes out as it comes, not at the end
        content, calls, finish, deltas = _streamed(auto, hermes, size)
        # the call goes out whole, where it stood; a block that is no call of a given tool stays text
        assert content == 'Let me check.  <tool_call>{"name": "nope", "arguments": {}}</tool_call>Done.'
        assert [(c["index"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
            [(0, "get_weather", {"city": "Paris"})]
        assert calls[0]["id"].startswith("call_") and finish == "tool_calls"
        kinds = ["call" if "tool_calls" in d else "text" for d in deltas]
        assert kinds.index("call") > 0 and "text" in kinds[kinds.index("call"):]
    # a block still open at the end is text; a whole-answer call (Llama 3.1's JSON) is held to the end
    assert _streamed(auto, "a <tool_call>{\"name\":", 3, "length")[:3] == ("a <tool_call>{\"name\":", [], "length")
    whole = '{"name": "get_time", "parameters": {}}'
    for size in (1, 4, len(whole)):
        content, calls, finish, deltas = _streamed(auto, "  " + whole, size)
        assert content == "" and [c["function"]["name"] for c in calls] == ["get_time"] and finish == "tool_calls"
        assert len(deltas) == 1
    # "[TOOL" may become Mistral's marker: held; "[1, 2] is a list" is a whole-answer candidate, and
    # not a call: all of it comes as content at the end
    assert _streamed(auto, "[TOOL_CALLS] [{\"name\": \"get_time\", \"arguments\": {}}]", 2)[1][0]["function"]["name"] == \
        "get_time"
    assert _streamed(auto, "[1, 2] is a list", 3)[:3] == ("[1, 2] is a list", [], "stop")


def test_named_calls_stream_their_arguments():
    named = request(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}}).tool_mode
    _, calls, finish, deltas = _streamed(named, '{"city":"Paris"}', 3)
    assert len(deltas) == 6 and calls[0]["function"]["name"] == "get_weather" and "id" in calls[0]
    assert all("id" not in c and "name" not in c["function"] for c in calls[1:])
    assert "".join(c["function"]["arguments"] for c in calls) == '{"city":"Paris"}' and finish == "tool_calls"
    # an empty answer is still a call
    assert [c["function"] for c in _streamed(named, "", 1)[1]] == [{"name": "get_weather", "arguments": ""}]
