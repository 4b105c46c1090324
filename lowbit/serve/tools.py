"""Tool calling on the chat API (OpenAI's `tools` / `tool_choice`).

The tools go to the chat template as HF's `tools` variable, so a model whose template defines tool
use sees them as it was trained to. What comes back depends on `tool_choice`:

* a named function: the answer is held to that function's parameter schema by structured output
  and returned as one call of it (vLLM does the same), streamed piece by piece as its arguments;
* "required": held to a JSON array of {"name", "arguments"} objects, one per call, each naming a
  given tool with arguments of its schema (at most one with parallel_tool_calls false);
* "auto" (the default with tools): free text, streamed as it comes (`AutoCallStream`); calls
  written the way the common templates teach become tool calls and the rest stays content: Hermes-style `<tool_call>{"name": ..., "arguments":
  {...}}</tool_call>` blocks (Qwen2.5, Hermes, ...), a whole answer that is Llama 3.1's JSON call
  `{"name": ..., "parameters": {...}}` (after an optional `<|python_tag|>`; a list of them too), or
  Mistral's `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`;
* "none": free text, no calls.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from lowbit.engine.structured_output import StructuredOutput
from lowbit.serve.responses import answer_delta

_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class ToolMode:
    kind: str  # "none" | "auto" | "required" | "named"
    tools: tuple = ()  # OpenAI tool definitions as dicts (what the template gets)
    name: str | None = None  # the named function
    parallel: bool = True

    @classmethod
    def of(cls, tools, choice, parallel: bool | None) -> "ToolMode":
        """From the request's tools (protocol.Tool list or None), tool_choice and
        parallel_tool_calls; ValueError says what does not fit together."""
        defs = tuple(t.model_dump(exclude_none=True) for t in tools or [])
        names = [d["function"]["name"] for d in defs]
        if len(set(names)) != len(names):
            raise ValueError("tools: function names must be unique")
        if choice is None:
            choice = "auto" if defs else "none"
        if isinstance(choice, str):
            if choice in ("auto", "required") and not defs:
                raise ValueError(f"tool_choice {choice!r} needs tools")
            return cls(choice, defs, None, parallel is not False)
        name = choice.function.name
        if name not in names:
            raise ValueError(f"tool_choice names function {name!r}, which is not among the tools "
                             f"({', '.join(names) or 'none given'})")
        return cls("named", defs, name, parallel is not False)

    def template_tools(self) -> list[dict] | None:
        return list(self.tools) or None

    def _parameters(self, name: str) -> dict:
        fn = next(d["function"] for d in self.tools if d["function"]["name"] == name)
        return fn.get("parameters") or _NO_PARAMETERS

    def grammar(self) -> StructuredOutput | None:
        """The structured output a forced call needs; None where the model answers freely."""
        if self.kind == "named":
            return StructuredOutput(json_schema=self._parameters(self.name))
        if self.kind != "required":
            return None
        calls = [{"type": "object", "properties": {"name": {"const": d["function"]["name"]},
                                                   "arguments": self._parameters(d["function"]["name"])},
                  "required": ["name", "arguments"], "additionalProperties": False} for d in self.tools]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not self.parallel:
            schema["maxItems"] = 1
        return StructuredOutput(json_schema=schema)

    @property
    def buffers(self) -> bool:
        """Whether a streamed answer is held back until it ends ("required": a JSON list of calls);
        a named call streams as its arguments (`argument_delta`), an "auto" answer through
        `AutoCallStream`."""
        return self.kind == "required"

    def argument_delta(self, text: str, first: bool) -> dict:
        """A named call's streamed `tool_calls` entry carrying the next piece of its arguments; the
        first also carries the call's id, type and function name (OpenAI's streamed shape)."""
        if first:
            return {"index": 0, **_call(self.name, text)}
        return {"index": 0, "function": {"arguments": text}}

    def parse(self, text: str, finish_reason: str) -> tuple[str | None, list[dict] | None]:
        """-> (content, tool_calls) of a finished answer in OpenAI's shape. An answer cut short
        (finish_reason "length") or one whose calls do not parse stays content."""
        if self.kind == "none" or finish_reason != "stop":
            return text, None
        if self.kind == "named":
            return None, [_call(self.name, text)]
        if self.kind == "required":  # the grammar made it a list of {name, arguments}
            items = _json(text)
            if items is None:
                return text, None
            return None, [_call(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in items]
        names = {d["function"]["name"] for d in self.tools}
        blocks = _HERMES_CALL.findall(text)
        if blocks:
            calls = _calls_of([_json(b) for b in blocks], names)
            content = _HERMES_CALL.sub("", text).strip()
            return (content or None, calls) if calls else (text, None)
        whole = text.strip()
        for prefix in ("[TOOL_CALLS]", "<|python_tag|>"):
            whole = whole.removeprefix(prefix).strip()
        parsed = _json(whole) if whole.startswith(("{", "[")) else None
        calls = _calls_of(parsed if isinstance(parsed, list) else [parsed], names) if parsed is not None else None
        return (None, calls) if calls else (text, None)


_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_WHOLE_ANSWER_STARTS = ("{", "[", "[TOOL_CALLS]", "<|python_tag|>")  # the formats that are the whole answer


class AutoCallStream:
    """A streamed "auto" answer, split into content and tool calls as it grows, so that text goes
    out as it is generated instead of at the end (vLLM's tool parsers stream the same way).

    An answer whose first non-blank text can begin a whole-answer call (Llama 3.1's JSON, Mistral's
    `[TOOL_CALLS]`, `<|python_tag|>`) is held to its end and parsed as `ToolMode.parse` does. Any
    other answer streams as content, except a Hermes `<tool_call>...</tool_call>` block, held until
    it closes and then sent as one call (or, if it is not a call of a given tool, as the text it
    was), and the few characters at the end that may open such a block. Unlike the whole answer's
    parse, content around the calls is not stripped, and a block that is no call does not turn the
    other blocks back into text: what went out stays out."""

    def __init__(self, mode: ToolMode):
        self.mode = mode
        self.names = {d["function"]["name"] for d in mode.tools}
        self.text = ""
        self.sent = 0  # text[:sent] has gone out
        self.whole: bool | None = None  # a whole-answer format: decided on the first non-blank text
        self.calls = 0

    def feed(self, delta: str, finish_reason: str | None) -> list[dict]:
        """The answer's next text (and, on its last piece, its finish_reason) -> the deltas to send:
        {"content": ...} and {"tool_calls": [...]} in order."""
        self.text += delta
        done = finish_reason is not None
        if self.whole is None:
            head = self.text.lstrip()
            if not head and not done:
                return []
            if any(head.startswith(m) for m in _WHOLE_ANSWER_STARTS):
                self.whole = True
            elif any(m.startswith(head) for m in _WHOLE_ANSWER_STARTS) and not done:
                return []  # "[TOOL" or "<|py" may still become a marker
            else:
                self.whole = False
        if self.whole:
            if not done:
                return []
            content, calls = self.mode.parse(self.text, finish_reason)
            self.calls = len(calls or [])
            delta = answer_delta(content, calls)  # as a "required" answer goes out at its end
            return [delta] if delta else []
        return self._hermes(done)

    def _hermes(self, done: bool) -> list[dict]:
        out = []
        while True:
            start = self.text.find(_OPEN, self.sent)
            if start < 0:
                end = len(self.text) if done else len(self.text) - _partial_open(self.text, self.sent)
                self._content(out, end)
                return out
            self._content(out, start)
            close = self.text.find(_CLOSE, start)
            if close < 0:
                if done:  # an unclosed block: its text
                    self._content(out, len(self.text))
                return out
            after = close + len(_CLOSE)
            calls = _calls_of([_json(self.text[start + len(_OPEN):close].strip())], self.names)
            if calls:
                out.append({"tool_calls": [{"index": self.calls, **calls[0]}]})
                self.calls += 1
                self.sent = after
            else:
                self._content(out, after)

    def _content(self, out: list, end: int) -> None:
        if end > self.sent:
            out.append({"content": self.text[self.sent:end]})
            self.sent = end

    def finish_reason(self, finish_reason: str) -> str:
        return "tool_calls" if self.calls else finish_reason


class StreamedChoice:
    """What one streamed chat choice sends as its answer grows, by tool mode: plain text as content;
    a named call as the pieces of its arguments; an "auto" answer through AutoCallStream;
    "required" nothing before the end (its whole list of calls goes out then, `ToolMode.buffers`)."""

    def __init__(self, mode: ToolMode):
        self.mode = mode
        self.auto = AutoCallStream(mode) if mode.kind == "auto" else None
        self.called = False  # a named call's id and name went out

    def deltas(self, text: str, finish_reason: str | None) -> list[dict]:
        """The answer's next text (and, on its last piece, its finish_reason) -> deltas to send."""
        if self.auto is not None:
            return self.auto.feed(text, finish_reason)
        if self.mode.kind == "named":
            if not text and (finish_reason is None or self.called):
                return []
            first, self.called = not self.called, True  # the call goes out even if empty
            return [{"tool_calls": [self.mode.argument_delta(text, first)]}]
        if self.mode.buffers:
            return []
        return [{"content": text}] if text else []

    def finish_reason(self, finish_reason: str) -> str:
        if self.auto is not None:
            return self.auto.finish_reason(finish_reason)
        if self.mode.kind == "named" and finish_reason == "stop":
            return "tool_calls"
        return finish_reason


def _partial_open(text: str, start: int) -> int:
    """The length of the longest end of text[start:] that begins `<tool_call>` (held back)."""
    for k in range(min(len(_OPEN) - 1, len(text) - start), 0, -1):
        if _OPEN.startswith(text[len(text) - k:]):
            return k
    return 0


def _json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def _calls_of(items: list, names: set[str]) -> list[dict] | None:
    """Calls from parsed {"name", "arguments" | "parameters"} objects; None unless every one is a
    call of a given tool (then the text is left as it was)."""
    calls = []
    for c in items:
        if not isinstance(c, dict) or c.get("name") not in names:
            return None
        args = c.get("arguments", c.get("parameters", {}))
        if not isinstance(args, (dict, str)):
            return None
        calls.append(_call(c["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)))
    return calls or None


def _call(name: str, arguments: str) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}
