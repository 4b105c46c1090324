"""The OpenAI request shapes we accept, and the error shape we answer with.

Unknown fields are refused (as OpenAI's own API does: "Unrecognized request argument"), so a
misspelt option is an error the client sees, not a silent default.
"""
from __future__ import annotations

import functools
import json
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lowbit.engine.structured_output import StructuredOutput
from lowbit.errors import LowbitError


class ErrorResponse(Exception):
    """Raised anywhere in a handler; answered as {"error": {...}} with `status`."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None  # None: an assistant turn of tool calls only
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None  # an assistant turn's calls
    tool_call_id: Optional[str] = None  # a tool turn answers this call

    @model_validator(mode="after")
    def _content_unless_calls(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"content is required in a {self.role} message (only an assistant turn of "
                             "tool_calls may leave it out)")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def for_template(self) -> dict:
        """The message as HF chat templates read it (developer is system; a call's arguments a dict)."""
        msg = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                                 for c in self.tool_calls]
        if self.tool_call_id is not None:
            msg["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            msg["name"] = self.name
        return msg


def _arguments(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text  # passed on as sent: the template shows what the client wrote


class FunctionDef(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None  # a JSON schema; none: no arguments
    strict: Optional[bool] = None  # the grammar holds forced calls to the schema either way


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Strict):
    include_usage: bool = False  # a last chunk with the request's usage
    continuous_usage_stats: bool = False  # usage so far on every chunk (vLLM's extension)


class JsonSchemaFormat(_Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(max_length=64)
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")  # `schema` is a pydantic method
    strict: Optional[bool] = None  # the grammar always holds the output to the schema


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class _Sampling(_Strict):
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's default
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    logit_bias: Optional[dict[str, float]] = None  # token id (as a string, OpenAI's shape) -> bias in [-100, 100]
    response_format: Optional[ResponseFormat] = None
    # vLLM's guided decoding fields (the openai client sends them in extra_body)
    guided_json: Union[dict[str, Any], str, None] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None

    def structured_output(self) -> StructuredOutput | None:
        """What response_format or a guided_* field asks the output to match; None for free text."""
        def spec(param: str, **what) -> tuple[str, StructuredOutput]:
            try:
                return param, StructuredOutput(**what)
            except LowbitError as e:
                raise ErrorResponse(400, f"{param}: {e}", param=param) from None

        asked = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            asked.append(spec("response_format", json_object=True))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise ErrorResponse(400, "response_format: type json_schema needs json_schema.schema",
                                    param="response_format")
            asked.append(spec("response_format", json_schema=rf.json_schema.schema_))
        if self.guided_json is not None:
            schema = self.guided_json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as e:
                    raise ErrorResponse(400, f"guided_json: not JSON ({e})", param="guided_json") from None
            asked.append(spec("guided_json", json_schema=schema))
        if self.guided_regex is not None:
            asked.append(spec("guided_regex", regex=self.guided_regex))
        if self.guided_choice is not None:
            asked.append(spec("guided_choice", choice=self.guided_choice))
        if len(asked) > 1:
            raise ErrorResponse(400, f"give one of response_format, guided_json, guided_regex, guided_choice; got "
                                     f"{', '.join(name for name, _ in asked)}", param=asked[1][0])
        return asked[0][1] if asked else None

    def logit_bias_ids(self, vocab_size: int) -> dict[int, float]:
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            try:
                token = int(key)
            except ValueError:
                token = -1
            if not 0 <= token < vocab_size:
                raise ErrorResponse(400, f"logit_bias: key {key!r} is not a token id; keys are token ids in "
                                         f"[0, {vocab_size}) written as strings", param="logit_bias")
            if not -100 <= value <= 100:
                raise ErrorResponse(400, f"logit_bias: {value} for token {token} is outside [-100, 100]",
                                    param="logit_bias")
            bias[token] = value
        return bias

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ErrorResponse(400, "stop: at most 4 non-empty strings", param="stop")
        return stops


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    tools: Optional[list[Tool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: Optional[bool] = None

    @functools.cached_property
    def tool_mode(self) -> "ToolMode":
        """Made once a request: the handler and structured_output() both read it."""
        from lowbit.serve.tools import ToolMode

        try:
            return ToolMode.of(self.tools, self.tool_choice, self.parallel_tool_calls)
        except ValueError as e:
            raise ErrorResponse(400, str(e), param="tool_choice") from None

    def structured_output(self) -> StructuredOutput | None:
        forced = self.tool_mode.grammar()  # a forced tool call is a JSON schema of its own
        asked = super().structured_output()
        if forced is not None and asked is not None:
            raise ErrorResponse(400, "a forced tool call (tool_choice required or a named function) cannot take "
                                     "response_format or guided_* as well", param="tool_choice")
        return forced or asked


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int]]
    max_tokens: Optional[int] = Field(16, ge=1)  # the completions API's default
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    echo: bool = False
