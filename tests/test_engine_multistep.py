"""Several greedy decode steps per host round trip (EngineConfig.num_scheduler_steps): the same
tokens, texts and finish reasons as one step at a time, with sequences ending inside a run of
steps (max_tokens, the stop token, a stop string), a sampled request beside greedy ones, a request
waiting for a place, and the prefix cache reused afterwards. On the CPU the steps' inputs are
made on the host; the CUDA-graph path (inputs made on the GPU) is checked on the device."""
import pytest
import torch

from lowbit.engine.llm import LLM
from lowbit.engine.sampling_params import SamplingParams

# two long answers and one that ends on the stop token after 12 tokens
CHATS = ["Write a long story about a dragon.", "Explain how a car engine works, in detail.",
         "Name three primary colors."]


@pytest.fixture(scope="module")
def prompts(smol):
    tok = smol[1]
    return [tok.encode_chat([{"role": "user", "content": c}]) for c in CHATS]


def _llm(smol, steps, **kw):
    return LLM(smol, max_model_len=256, num_kv_blocks=96, num_scheduler_steps=steps, **kw)


def _run(llm, prompts, params):
    """Steps the engine by hand -> (outputs in prompt order, engine steps taken)."""
    finals = {}
    ids = []
    for p, sp in zip(prompts, params):
        rid = llm.engine.new_request_id()
        ids.append(rid)
        llm.engine.add_request(p, sp, rid, sink=lambda out: out.finished and finals.__setitem__(out.request_id, out))
    steps = 0
    while llm.engine.has_unfinished():
        llm.engine.step()
        steps += 1
    return [finals[i] for i in ids], steps


def _same(a, b):
    assert [(o.token_ids, o.text, o.finish_reason) for o in a] == [(o.token_ids, o.text, o.finish_reason) for o in b]


def test_runs_of_steps_give_one_steps_tokens(smol, prompts):
    # runs of 5: the third answer's stop token (its 13th token) comes in the middle of one; the
    # runs before max_tokens 19 and 16 are cut short to end there
    params = [SamplingParams(max_tokens=19), SamplingParams(max_tokens=16), SamplingParams(max_tokens=50)]
    one, one_steps = _run(_llm(smol, 1), prompts, params)
    llm = _llm(smol, 5)
    five, five_steps = _run(llm, prompts, params)
    _same(one, five)
    assert [o.finish_reason for o in one] == ["length", "length", "stop"]
    assert len(one[2].token_ids) % 5 != 0  # the stop token is not the last of its run
    # the prefill step samples the first token; then runs of 5, cut to what the shortest has left
    assert one_steps == 19 and five_steps == 5  # 1 + 18 against 1 + (2-6, 7-11, 12-16, 17-19)
    # 7-11 and 12-16 were enqueued while the run before still ran (all three running, none near its
    # end); 17-19 was scheduled (the third had stopped at 13)
    assert llm.engine.runs_continued == 2


def test_a_stop_on_the_last_step_of_a_run_that_was_continued(smol, prompts):
    """The next run is enqueued while the GPU runs a run's last step; a stop token on that step
    ends the sequence, and the next run's tokens for it are dropped, its cache freed meanwhile."""
    tokens = _run(_llm(smol, 1), prompts[:1], [SamplingParams(max_tokens=40, ignore_eos=True)])[0][0].token_ids
    # runs of 4 after the first token: tokens 1-4, 5-8, ...; a token seen first at the end of one
    at = next(i for i in range(8, 40, 4) if tokens[i] not in tokens[:i])
    # the other request goes on past the stop, for a few runs of its own
    params = [SamplingParams(max_tokens=40, stop_token_ids=[tokens[at]], ignore_eos=True),
              SamplingParams(max_tokens=at + 6, ignore_eos=True)]
    one, _ = _run(_llm(smol, 1), prompts[:2], params)
    llm = _llm(smol, 4)
    four, _ = _run(llm, prompts[:2], params)
    _same(one, four)
    assert four[0].finish_reason == "stop" and len(four[0].token_ids) == at
    assert llm.engine.runs_continued >= at // 4 - 1  # every run up to the stop was continued
    again, _ = _run(llm, prompts[1:2], params[1:])  # the cache freed under the dropped run serves anew
    _same(one[1:], again)


def test_a_stop_string_inside_a_run_and_a_sampled_request(smol, prompts):
    greedy_one = _run(_llm(smol, 1), prompts[:1], [SamplingParams(max_tokens=16)])[0][0]
    # a stop string that the greedy answer reaches after a few tokens
    stop = greedy_one.text[9:14]
    assert stop and stop not in greedy_one.text[:9]
    params = [SamplingParams(max_tokens=16, stop=[stop]),
              SamplingParams(max_tokens=8, temperature=0.8, seed=3),  # sampled: one step at a time
              SamplingParams(max_tokens=10)]
    one, _ = _run(_llm(smol, 1), prompts, params)
    eight, _ = _run(_llm(smol, 8), prompts, params)
    _same(one, eight)
    assert one[0].finish_reason == "stop" and one[0].text == greedy_one.text[:9]


def test_a_waiting_request_and_the_prefix_cache_afterwards(smol, prompts):
    params = [SamplingParams(max_tokens=10)] * 3
    one, _ = _run(_llm(smol, 1, max_batch_size=2), prompts, params)  # the third waits for a place
    llm = _llm(smol, 4, max_batch_size=2)
    four, _ = _run(llm, prompts, params)
    _same(one, four)
    hits = llm.engine.block_manager.prefix_hit_tokens
    again, _ = _run(llm, prompts[:1], params[:1])  # blocks hashed after runs of steps are found again
    _same(one[:1], again)
    assert llm.engine.block_manager.prefix_hit_tokens - hits >= 16


def test_a_requests_first_token_comes_after_one_step(smol):
    """A one-token prompt is a decode step from the start; its first token still goes out alone."""
    llm = _llm(smol, 8)
    seen = []
    llm.engine.add_request([1], SamplingParams(max_tokens=10, ignore_eos=True), sink=lambda o: seen.append(len(o.token_ids)))
    llm.engine.step()
    assert seen == [1]
    llm.engine.step()
    assert seen[-1] == 9  # then a run of 8, the tokens taken one step at a time
    assert seen == list(range(1, 10))


def test_bad_num_scheduler_steps_is_refused(smol):
    from lowbit.errors import LowbitError

    with pytest.raises(LowbitError, match="num_scheduler_steps=0: must be >= 1"):
        _llm(smol, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_runs_of_steps_from_cuda_graphs_give_one_steps_tokens():
    """On the GPU: a W4A16 model of Llama-2-7B's shapes (dummy weights) from CUDA graphs, 8 steps a
    run (the default there) against 1, at batch sizes 1 and 3 (a padded graph of 4)."""
    from lowbit.loading.dummy import build_dummy_model

    triple = build_dummy_model("llama2-7b", 4, 128)
    kw = dict(max_model_len=256, num_kv_blocks=64, max_batch_size=4)
    one, eight = LLM(triple, num_scheduler_steps=1, **kw), LLM(triple, **kw)
    assert eight.engine.num_scheduler_steps == 8 and eight.engine.runner.graphs is not None
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    for batch in (prompts[:1], prompts):
        params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (45, 29, 40)][:len(batch)]
        _same(_run(one, batch, params)[0], _run(eight, batch, params)[0])
    assert eight.engine.runs_continued > 0
    # a stop token inside a run: the host takes the run's steps while the GPU still runs the later
    # ones (whose tokens it drops), and frees the stopped sequence's blocks meanwhile. Random weights
    # fall into short cycles: the prompt is one whose answer has a token seen first past its start.
    for prompt in ([9], [1, 2, 3], [17, 4], [250, 3, 99], [31]):
        tokens = _run(one, [prompt], [SamplingParams(max_tokens=45, ignore_eos=True)])[0][0].token_ids
        fresh = [i for i in range(2, 45) if tokens[i] not in tokens[:i]]
        if fresh:
            break
    at = fresh[-1]
    params = [SamplingParams(max_tokens=45, stop_token_ids=[tokens[at]], ignore_eos=True),
              SamplingParams(max_tokens=40, ignore_eos=True)]
    first = _run(one, [prompt, prompts[1]], params)[0]
    assert first[0].finish_reason == "stop" and len(first[0].token_ids) == at
    _same(first, _run(eight, [prompt, prompts[1]], params)[0])
