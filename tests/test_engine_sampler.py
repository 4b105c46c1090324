"""The batched sampler on hand-made logits: no model."""
import math

import pytest
import torch

from lowbit.engine.sampler import SamplingBatch, apply_penalties, sample
from lowbit.engine.sampling_params import SamplingParams
from lowbit.engine.sequence import Sequence
from lowbit.errors import LowbitError


def _batch(params, prompts=None, outputs=None, vocab=4, seeded=True):
    seqs = []
    for i, p in enumerate(params):
        s = Sequence(str(i), (prompts or [[0]] * len(params))[i], p)
        s.token_ids += (outputs or [[]] * len(params))[i]
        seqs.append(s)
    gens = [torch.Generator().manual_seed(p.seed) if seeded and p.seed is not None else None for p in params]
    return SamplingBatch.build(seqs, gens, vocab, torch.device("cpu"))


def _draws(logits, params, n=400):
    """Token counts over n draws from one row."""
    b = _batch([params], vocab=logits.shape[-1])
    counts = torch.zeros(logits.shape[-1])
    for _ in range(n):
        counts[int(sample(logits[None], b)[0][0])] += 1
    return counts


def test_greedy_rows_take_the_argmax_beside_random_rows():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 0.0]])
    b = _batch([SamplingParams(), SamplingParams(temperature=1.0, seed=1)])
    tokens, _ = sample(logits, b)
    assert int(tokens[0]) == 1 and int(tokens[1]) == 0  # row 1: p(0) = 0.98, seed fixed


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0, 3.0]])
    b = _batch([SamplingParams(repetition_penalty=2.0)], prompts=[[0]], outputs=[[1]])
    assert torch.allclose(apply_penalties(logits, b), torch.tensor([[1.0, -4.0, 1.0, 3.0]]))


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    logits = torch.zeros(1, 4)
    b = _batch([SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)], prompts=[[3, 3]], outputs=[[0, 0, 1]])
    # token 0: -0.5 - 2*0.25; token 1: -0.5 - 0.25; token 3 is only in the prompt: untouched
    assert torch.allclose(apply_penalties(logits, b), torch.tensor([[-1.0, -0.75, 0.0, 0.0]]))


def test_penalties_change_the_greedy_choice():
    logits = torch.tensor([[3.0, 2.5, 0.0, 0.0]])
    plain = _batch([SamplingParams()], outputs=[[0]])
    penalized = _batch([SamplingParams(frequency_penalty=1.0)], outputs=[[0]])
    assert int(sample(logits, plain)[0][0]) == 0 and int(sample(logits, penalized)[0][0]) == 1


def test_min_p_drops_tokens_below_the_fraction_of_the_top():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    counts = _draws(logits, SamplingParams(temperature=1.0, min_p=0.2, seed=0))
    assert counts[3] == 0 and (counts[:3] > 0).all()  # 0.05 < 0.2 * 0.5; 0.15 stays
    assert (_draws(logits, SamplingParams(temperature=1.0, seed=0))[3]) > 0


def test_top_k_and_top_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert set(_draws(logits, SamplingParams(temperature=1.0, top_k=2, seed=0)).nonzero().flatten().tolist()) == {0, 1}
    assert set(_draws(logits, SamplingParams(temperature=1.0, top_p=0.7, seed=0)).nonzero().flatten().tolist()) == {0, 1}


def test_top_k_one_and_a_tiny_top_p_keep_only_each_rows_argmax():
    # top_p: a token is dropped once the mass before it reaches top_p, so the first always stays
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        b = _batch([SamplingParams(temperature=2.0, seed=i, **kw) for i in range(4)], vocab=50)
        for _ in range(20):
            assert torch.equal(sample(logits, b)[0], logits.argmax(-1))


def test_temperature_draws_follow_the_distribution():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1, 1e-9]))
    freq = _draws(logits, SamplingParams(temperature=1.0, seed=3), n=2000) / 2000
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1, 0.0]), atol=0.04)


def test_a_seeded_row_draws_the_same_alone_or_in_any_batch():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    seeded = SamplingParams(temperature=1.0, seed=42)
    alone_batch = _batch([seeded], vocab=50)
    alone = [int(sample(logits[1:2], alone_batch)[0][0]) for _ in range(6)]
    mixed_batch = _batch([SamplingParams(temperature=0.7), seeded, SamplingParams(temperature=1.0, seed=7)], vocab=50)
    mixed = [int(sample(logits, mixed_batch)[0][1]) for _ in range(6)]
    other_seed = _batch([SamplingParams(temperature=1.0, seed=43)], vocab=50)
    assert alone == mixed and len(set(alone)) > 1
    assert alone != [int(sample(logits[1:2], other_seed)[0][0]) for _ in range(6)]


def test_logprobs_are_the_models_and_list_top_alternatives():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    _, lps = sample(logits, _batch([SamplingParams(logprobs=2)]))
    expect = torch.log_softmax(logits[0], -1)
    (tok, lp), *top = lps[0]
    assert tok == 0 and math.isclose(lp, float(expect[0]), rel_tol=1e-5)
    assert [t for t, _ in top] == [0, 1]
    _, none = sample(logits, _batch([SamplingParams()]))
    assert none is None


@pytest.mark.parametrize("kw", [dict(top_p=0), dict(temperature=-1), dict(max_tokens=0), dict(min_p=2),
                                dict(repetition_penalty=0), dict(stop=[""])])
def test_bad_sampling_params_say_which_and_why(kw):
    with pytest.raises(LowbitError, match=next(iter(kw))):
        SamplingParams(**kw)
