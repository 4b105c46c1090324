"""The engine on the default model: batched greedy tokens equal each prompt alone through the
model without a KV cache, with preemption, chunked prefill, prefix caching and int8 KV."""
import asyncio

import pytest
import torch

from lowbit.engine.llm import LLM
from lowbit.engine.sampling_params import SamplingParams

MAX_TOKENS = 10


@pytest.fixture(scope="module")
def stop_ids(smol):
    _, tok, ckpt = smol
    return tok.stop_token_ids(ckpt.generation_config().get("eos_token_id"))


@torch.inference_mode()
def greedy_without_cache(model, ids: list[int], max_tokens: int, stop_ids: set[int]) -> list[int]:
    """The reference: every step runs the model over the whole sequence so far, no KV cache."""
    out = []
    while len(out) < max_tokens:
        nxt = int(model(torch.tensor([ids + out]), last_only=True)[0, -1].argmax())
        if nxt in stop_ids:
            break
        out.append(nxt)
    return out


@pytest.fixture(scope="module")
def alone(smol, prompt_ids, stop_ids):
    """Greedy tokens of each prompt alone, without the engine."""
    return [greedy_without_cache(smol[0], ids, MAX_TOKENS, stop_ids) for ids in prompt_ids]


def _llm(smol, **kw):
    kw = {"max_model_len": 128, "num_kv_blocks": 64, "max_batch_size": 8, **kw}
    return LLM(smol, **kw)


def _greedy(llm, prompts, max_tokens=MAX_TOKENS):
    return [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=max_tokens))]


def test_batch_equals_each_prompt_alone(smol, prompt_ids, alone):
    llm = _llm(smol)
    outs = llm.generate(prompt_ids, SamplingParams(max_tokens=MAX_TOKENS))
    assert [o.token_ids for o in outs] == alone
    assert all(o.finish_reason == "length" and o.finished and o.error is None for o in outs)
    assert outs[0].text == smol[1].decode(alone[0])
    assert llm.engine.block_manager.num_free_blocks == 64


def test_batch_with_preemption_equals_alone(smol, prompt_ids, alone):
    # 16 blocks of 4 tokens hold one max_model_len sequence, not five prompts with their outputs
    llm = _llm(smol, block_size=4, num_kv_blocks=16, max_model_len=64)
    assert _greedy(llm, prompt_ids) == alone
    assert llm.engine.scheduler.num_preemptions > 0


def test_chunked_prefill_equals_alone(smol, prompt_ids, alone):
    llm = _llm(smol, max_num_batched_tokens=8, max_batch_size=4)
    assert max(len(p) for p in prompt_ids) > 8  # the long prompts are read in chunks
    assert _greedy(llm, prompt_ids) == alone


def test_prefix_cache_hits_a_shared_system_prompt_and_changes_nothing(smol, stop_ids):
    _, tok, _ = smol
    system = {"role": "system", "content": "You are a helpful assistant who answers in one short sentence."}
    chats = [[system, {"role": "user", "content": q}] for q in ("What is the sun?", "Name a fruit.")]
    llm = _llm(smol, block_size=8)
    first = llm.chat(chats[0], SamplingParams(max_tokens=6))[0]
    second = llm.chat(chats[1], SamplingParams(max_tokens=6))[0]
    assert first.num_cached_tokens == 0 and second.num_cached_tokens >= 16
    assert llm.engine.block_manager.prefix_hit_tokens == second.num_cached_tokens
    uncached = _llm(smol, block_size=8, enable_prefix_caching=False).chat(chats[1], SamplingParams(max_tokens=6))[0]
    assert second.token_ids == uncached.token_ids
    assert second.token_ids == greedy_without_cache(smol[0], tok.encode_chat(chats[1]), 6, stop_ids)


def test_an_overlong_prompt_fails_alone(smol, prompt_ids, alone):
    llm = _llm(smol, max_model_len=32)
    outs = llm.generate([prompt_ids[0], list(range(1, 40)), prompt_ids[2]], SamplingParams(max_tokens=MAX_TOKENS))
    assert outs[1].finish_reason == "error" and "max_model_len=32" in str(outs[1].error)
    assert [outs[0].token_ids, outs[2].token_ids] == [alone[0], alone[2]]


def test_output_stops_at_max_model_len(smol, prompt_ids):
    llm = _llm(smol, max_model_len=len(prompt_ids[0]) + 3)
    out = llm.generate(prompt_ids[0], SamplingParams(max_tokens=50))[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


def test_stop_string_cuts_the_text(smol, prompt_ids, alone):
    _, tok, _ = smol
    full = tok.decode(alone[2])  # " 5, 6, 7, 8, ..."
    llm = _llm(smol)
    out = llm.generate(prompt_ids[2], SamplingParams(max_tokens=MAX_TOKENS, stop=["7,"]))[0]
    assert out.finish_reason == "stop" and out.text == full[:full.index("7,")]
    kept = llm.generate(prompt_ids[2], SamplingParams(max_tokens=MAX_TOKENS, stop=["7,"],
                                                      include_stop_str_in_output=True))[0]
    assert kept.text == full[:full.index("7,") + 2]


def test_stop_token_id_ends_without_appending(smol, prompt_ids, alone):
    k = next(i for i in range(2, MAX_TOKENS) if alone[0][i] not in alone[0][:i])
    out = _llm(smol).generate(prompt_ids[0], SamplingParams(max_tokens=MAX_TOKENS, stop_token_ids=[alone[0][k]]))[0]
    assert out.finish_reason == "stop" and out.token_ids == alone[0][:k]


def test_seeded_sampling_repeats_whatever_the_batch(smol, prompt_ids):
    llm = _llm(smol)
    seeded = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.95, seed=1234)
    alone = llm.generate(prompt_ids[1], seeded)[0].token_ids
    mixed = llm.generate([prompt_ids[0]] + [prompt_ids[1]] * 3, [SamplingParams(max_tokens=8, temperature=0.8)]
                         + [seeded] * 3)
    assert all(o.token_ids == alone for o in mixed[1:])
    other = llm.generate(prompt_ids[1], SamplingParams(max_tokens=8, temperature=1.0, top_p=0.95, seed=99))[0]
    assert other.token_ids != alone


def test_logprobs_per_token(smol, prompt_ids, alone):
    out = _llm(smol).generate(prompt_ids[0], SamplingParams(max_tokens=4, logprobs=3))[0]
    assert len(out.logprobs) == 4
    for token, entry in zip(alone[0], out.logprobs):
        assert entry[0][0] == token and len(entry) == 4
        assert entry[1][0] == token  # greedy: the sampled token is the top one
        assert entry[1][1] >= entry[2][1] >= entry[3][1]


def test_stream_deltas_add_up_and_abort_frees_the_request(smol, prompt_ids, alone):
    llm = _llm(smol)

    async def run():
        pieces, ids = [], []
        async for out in llm.stream(prompt_ids[1], SamplingParams(max_tokens=MAX_TOKENS)):
            pieces.append(out.delta_text)
            ids += out.delta_token_ids
        final = out
        aborted = llm.async_engine.add_request(prompt_ids[3], SamplingParams(max_tokens=100))
        async for out in aborted:
            break
        await aborted.aclose()  # what a server does when its client goes away
        while llm.engine.has_unfinished():
            await asyncio.sleep(0.01)
        return pieces, ids, final

    pieces, ids, final = asyncio.run(run())
    llm.shutdown()
    assert final.finished and ids == alone[1] and "".join(pieces) == final.text
    assert not llm.engine.has_unfinished() and llm.engine.block_manager.num_free_blocks == 64


def test_stream_never_sends_text_a_stop_string_removes(smol, prompt_ids, alone):
    llm = _llm(smol)

    async def run():
        return [out async for out in llm.stream(prompt_ids[2], SamplingParams(max_tokens=MAX_TOKENS, stop=[" 7,"]))]

    outs = asyncio.run(run())
    llm.shutdown()
    full = smol[1].decode(alone[2])
    assert outs[-1].text == full[:full.index(" 7,")] == "".join(o.delta_text for o in outs)
    assert all(o.text.startswith(prev.text) for prev, o in zip(outs, outs[1:]))


def test_iter_outputs_streams_in_this_thread_and_closing_it_aborts(smol, prompt_ids, alone):
    llm = _llm(smol)
    outs = list(llm.iter_outputs(prompt_ids[1], SamplingParams(max_tokens=MAX_TOKENS)))
    assert [t for o in outs for t in o.delta_token_ids] == alone[1] and outs[-1].finished
    assert "".join(o.delta_text for o in outs) == outs[-1].text
    it = llm.iter_outputs(prompt_ids[3], SamplingParams(max_tokens=100))
    assert not next(it).finished
    it.close()  # a caller that stops reading (or Ctrl-C) ends the request
    assert not llm.engine.has_unfinished() and llm.engine.block_manager.num_free_blocks == 64

