"""Structured output on the default model: JSON schema, JSON object, regex and choice hold the
text to their grammar under greedy and random sampling, a constrained request leaves its batch
neighbours' tokens alone, and a bad grammar fails its own request with the parser's message."""
import json
import re

import pytest
import torch

from lowbit import LLM, SamplingParams, StructuredOutput
from lowbit.engine.structured_output import apply_bitmask
from lowbit.errors import LowbitError

# bounded: enums, booleans, a small integer range and a short string, so that even random
# sampling ends the object well inside max_tokens
SCHEMA = {"type": "object",
          "properties": {"city": {"type": "string", "maxLength": 16},
                         "continent": {"enum": ["Europe", "Asia", "Africa", "America", "Oceania"]},
                         "capital": {"type": "boolean"},
                         "rank": {"type": "integer", "minimum": 1, "maximum": 9}},
          "required": ["city", "continent", "capital", "rank"], "additionalProperties": False}
ASK = [{"role": "user", "content": "Give Paris as JSON: city, continent, capital (true/false), rank."}]


def matches_schema(obj) -> bool:
    p = SCHEMA["properties"]
    return (isinstance(obj, dict) and set(obj) == set(p) and isinstance(obj["city"], str) and len(obj["city"]) <= 16
            and obj["continent"] in p["continent"]["enum"] and isinstance(obj["capital"], bool)
            and isinstance(obj["rank"], int) and 1 <= obj["rank"] <= 9)


@pytest.fixture(scope="module")
def llm(smol):
    return LLM(smol, max_model_len=256, num_kv_blocks=96, max_batch_size=8)


def test_apply_bitmask_against_a_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 70, generator=g)
    bitmask = torch.randint(-2 ** 31, 2 ** 31 - 1, (3, 3), generator=g, dtype=torch.int64).to(torch.int32)
    out = apply_bitmask(logits, bitmask)
    for b in range(3):
        for t in range(70):
            allowed = (int(bitmask[b, t // 32]) >> (t % 32)) & 1
            assert out[b, t] == (logits[b, t] if allowed else float("-inf"))


def test_json_schema_greedy_and_sampled_beside_free_text(llm, smol):
    tok = smol[1]
    free = tok.encode("The capital of France is")
    alone = llm.generate([free], SamplingParams(max_tokens=8))[0].token_ids
    spec = StructuredOutput(json_schema=SCHEMA)
    greedy = SamplingParams(max_tokens=64, structured_output=spec)
    sampled = SamplingParams(max_tokens=64, temperature=1.0, seed=7, structured_output=spec)
    ask = tok.encode_chat(ASK)
    outs = llm.generate([ask, free, ask], [greedy, SamplingParams(max_tokens=8), sampled])
    for out in (outs[0], outs[2]):
        assert out.finish_reason == "stop", out
        assert matches_schema(json.loads(out.text)), out.text
    assert json.loads(outs[0].text)["city"] == "Paris"  # the model still answers the question
    assert outs[1].token_ids == alone  # the mask is per row: the free-text neighbour is untouched


def test_json_object_regex_and_choice(llm, smol):
    tok = smol[1]
    outs = llm.generate(
        [tok.encode_chat(ASK), "Call me at", "Is Paris in France? Answer:"],
        [SamplingParams(max_tokens=48, structured_output=StructuredOutput(json_object=True)),
         SamplingParams(max_tokens=16, structured_output=StructuredOutput(regex=r"\d{3}-\d{4}")),
         SamplingParams(max_tokens=8, ignore_eos=True, structured_output=StructuredOutput(choice=["yes", "no"]))])
    if outs[0].finish_reason == "stop":  # a JSON object has no bound: it may run to max_tokens
        assert isinstance(json.loads(outs[0].text), dict)
    else:
        assert outs[0].text.startswith("{")
    assert re.fullmatch(r"\d{3}-\d{4}", outs[1].text) and outs[1].finish_reason == "stop"
    # ignore_eos: the finished grammar ends the sequence, not max_tokens
    assert outs[2].text in ("yes", "no") and outs[2].finish_reason == "stop"


def test_a_bad_grammar_fails_its_request_alone(llm):
    outs = llm.generate(["Hello", "Hello"], [SamplingParams(max_tokens=4, structured_output=StructuredOutput(regex="(")),
                                             SamplingParams(max_tokens=4)])
    assert outs[0].finish_reason == "error" and "unclosed group" in str(outs[0].error)
    assert outs[1].finish_reason == "length" and outs[1].error is None
    with pytest.raises(LowbitError, match="exactly one"):
        StructuredOutput(regex="a", choice=["a"])
    with pytest.raises(LowbitError, match="choice"):
        StructuredOutput(choice=[])
