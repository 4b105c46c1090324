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
