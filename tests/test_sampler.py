import torch

from lowbit.layers.sampler import SamplingOptions, sample


def _logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 50, generator=g)


def test_greedy_is_argmax():
    x = _logits()
    assert torch.equal(sample(x, SamplingOptions()), x.argmax(-1))


def test_top_k_one_and_tiny_top_p_are_greedy():
    x = _logits()
    g = torch.Generator().manual_seed(1)
    assert torch.equal(sample(x, SamplingOptions(temperature=1.0, top_k=1), g), x.argmax(-1))
    assert torch.equal(sample(x, SamplingOptions(temperature=1.0, top_p=1e-6), g), x.argmax(-1))


def test_top_k_never_leaves_the_k_best():
    x = _logits()
    g = torch.Generator().manual_seed(2)
    allowed = torch.topk(x, 5, dim=-1).indices
    for _ in range(50):
        picked = sample(x, SamplingOptions(temperature=2.0, top_k=5), g)
        assert (allowed == picked[:, None]).any(-1).all()


def test_top_p_keeps_the_smallest_set_reaching_p():
    # probabilities 0.5, 0.3, 0.2: top_p=0.7 keeps the first two, never the third
    x = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    g = torch.Generator().manual_seed(3)
    seen = {int(sample(x, SamplingOptions(temperature=1.0, top_p=0.7), g)) for _ in range(200)}
    assert seen == {0, 1}
