"""Tensor parallelism (engine/tp_workers.py, QLinear.shard, LlamaModel.shard): every weight format
splits so that the ranks' shards compute the whole layer (column: the outputs side by side; row:
partial products that sum to it), and a model over 2 gloo ranks on the CPU generates the tokens one
rank does (AWQ weights, int8 KV), and a rank that dies fails the next step instead of hanging it."""
import copy

import pytest
import torch

from lowbit.engine.llm import LLM
from lowbit.engine.sampling_params import SamplingParams
from lowbit.errors import LowbitError
from lowbit.formats import awq_format, gptq_format
from lowbit.layers.linear import QLinear
from lowbit.layers.quantized_linear import AWQLinearMethod, GPTQLinearMethod
from lowbit.layers.w8a8_linear import W8A8LinearMethod
from lowbit.loading.dummy import W8A8_INT, build_dummy_model


def _filled(layer, tensors):
    for name, t in tensors.items():
        getattr(layer, name).copy_(t)
    if layer.bias is not None:
        layer.bias.copy_(torch.randn(layer.out_features, generator=torch.Generator().manual_seed(9)))
    layer.method.after_load(layer)
    return layer


def _layer(fmt: str, in_f=128, out_f=96, group=32, shards=None):
    g = torch.Generator().manual_seed(0)
    n_groups = in_f // group
    codes = torch.randint(0, 16, (out_f, in_f), generator=g).to(torch.uint8)
    scales = torch.rand(out_f, n_groups, generator=g) * 0.02 + 0.002
    zeros = torch.randint(1, 16, (out_f, n_groups), generator=g).to(torch.int32)
    if fmt == "dense":
        layer = QLinear(in_f, out_f, True, None, torch.float32, shards)
        return _filled(layer, {"weight": torch.randn(out_f, in_f, generator=g)})
    if fmt == "awq":
        layer = QLinear(in_f, out_f, True, AWQLinearMethod(4, group, prefix="t"), torch.float32, shards)
        return _filled(layer, awq_format.pack(codes, scales, zeros))
    if fmt == "gptq-act-order":
        g_idx = (torch.randperm(in_f, generator=g) // group).to(torch.int32)
        layer = QLinear(in_f, out_f, True, GPTQLinearMethod(4, group, prefix="t"), torch.float32, shards)
        return _filled(layer, gptq_format.pack(codes, scales, zeros, 4, group, g_idx))
    layer = QLinear(in_f, out_f, True, W8A8LinearMethod(W8A8_INT, "t"), torch.float32, shards)
    return _filled(layer, {"weight": torch.randint(-127, 128, (out_f, in_f), generator=g).to(torch.int8),
                           "weight_scale": torch.rand(out_f, 1, generator=g) * 0.01 + 0.001})


@pytest.mark.parametrize("fmt", ["dense", "awq", "gptq-act-order", "w8a8"])
def test_each_format_splits_into_shards_that_compute_the_whole_layer(fmt):
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    merged = [("q", 64), ("k", 16), ("v", 16)]  # a merged layer: each projection split alike
    full = _layer(fmt, shards=merged)
    y = full(x)
    world = 2
    cols = []
    for rank in range(world):
        part = copy.deepcopy(full)
        part.shard("column", rank, world)
        assert part.out_features == 48 and part.shards == [("q", 32), ("k", 8), ("v", 8)]
        cols.append(part.split(part(x)))
    for i, (start, width) in enumerate(((0, 64), (64, 16), (80, 16))):  # q, k, v: rank 0's half, then rank 1's
        torch.testing.assert_close(torch.cat([c[i] for c in cols], -1), y[:, start:start + width])
    full = _layer(fmt)
    y = full(x)
    partial = []
    for rank in range(world):
        part = copy.deepcopy(full)
        part.shard("row", rank, world)
        part.parallel = None  # one process: sum the partial products here instead of all-reducing
        partial.append(part(x[:, rank * 64:(rank + 1) * 64]))
    if fmt == "w8a8":  # each rank quantizes its slice of a token with that slice's own scale (as vLLM
        # does): not the unsplit layer's rounding, a rounding as fine or finer
        assert float((sum(partial) - y).norm() / y.norm()) < 0.02
    else:
        torch.testing.assert_close(sum(partial), y, rtol=2e-4, atol=2e-4)


def test_a_row_split_that_cuts_a_group_is_refused_by_layer():
    layer = _layer("awq", in_f=128, group=64)
    with pytest.raises(LowbitError, match="t: group size 64 does not divide this rank's inputs"):
        layer.shard("row", 1, 4)


def test_two_gloo_ranks_generate_one_ranks_tokens_and_a_dead_rank_fails_the_next_step():
    prompts = [[1, 5, 9], [7, 3, 2, 8, 11, 4]]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    for w_bits, kv_bits in ((4, 8),):  # AWQ with int8 KV (each format's split is tested above, in one process)
        one = LLM(build_dummy_model("tiny", w_bits, 64, "fp32", "cpu", seed=3), max_model_len=64, kv_bits=kv_bits)
        expected = [o.token_ids for o in one.generate(prompts, params)]
        two = LLM(build_dummy_model("tiny", w_bits, 64, "fp32", "cpu", seed=3), max_model_len=64, kv_bits=kv_bits,
                  tensor_parallel_size=2)
        try:
            attn = two.engine.runner.model.layers[0].self_attn
            assert (attn.n_heads, attn.n_kv, attn.qkv_proj.out_features) == (2, 1, 128)  # half of 4 + 2 + 2 heads
            assert [o.token_ids for o in two.generate(prompts, params)] == expected, (w_bits, kv_bits)
            # a rank that dies: the next step fails at once, naming it, and close() returns
            two._tp.procs[0].kill()
            two._tp.procs[0].join()
            out = two.generate(prompts[0], params)[0]
            assert out.finish_reason == "error" and "stopped: lowbit-tp-rank1" in str(out.error)
        finally:
            two.close()


def test_heads_that_do_not_split_are_refused_before_any_rank_starts():
    with pytest.raises(LowbitError, match="heads to divide by 3"):
        LLM(build_dummy_model("tiny", 16, 64, "fp32", "cpu"), tensor_parallel_size=3)


def test_closing_releases_the_decode_graphs_before_the_process_group(monkeypatch):
    """NCCL's communicator destroy waits until every CUDA graph that captured one of its collectives
    is destroyed, so rank 0's decode graphs must be gone before the process group is (a graph still
    held there hung the first 2-GPU runs with graphs at their end). On the CPU no graph is captured:
    the runner holds a DecodeGraphs with one replay, and closing must drop it before comm.close."""
    from lowbit.engine.cuda_graphs import DecodeGraphs
    from lowbit.parallel import comm

    two = LLM(build_dummy_model("tiny", 16, 64, "fp32", "cpu", seed=3), max_model_len=64, tensor_parallel_size=2)
    runner = two.engine.runner
    graphs = DecodeGraphs(lambda ids, pos: None, runner.cache, 2, runner.max_blocks_per_seq, runner.scratch_block,
                          runner.device)
    graphs.graphs[1] = lambda: None
    runner.graphs = graphs
    held_at_close = []
    real_close = comm.close
    monkeypatch.setattr(comm, "close", lambda: (held_at_close.append(runner.graphs), real_close()))
    two.close()
    assert held_at_close == [None] and graphs.graphs == {}


@pytest.mark.parametrize("w_bits", [16, 4])
def test_a_shard_built_layer_by_layer_equals_the_whole_model_sharded(w_bits):
    """LlamaModel.build_shard (what each rank runs: a layer made whole, filled, cut, then the next)
    gives the tensors of building the whole model and calling `shard`, for dummy weights (dense
    and AWQ) and for a checkpoint read from disk (the default GGUF's tied head included)."""
    whole = build_dummy_model("tiny", w_bits, 64, "fp32", "cpu", seed=5)[0]
    whole.shard(1, 2)
    part = build_dummy_model("tiny", w_bits, 64, "fp32", "cpu", seed=5, shard=(1, 2))[0]
    _assert_same(whole, part)


def test_a_checkpoints_shard_is_read_layer_by_layer(smol, gguf_path):
    from lowbit.loading.loader import load_model

    whole = copy.deepcopy(smol[0])
    whole.shard(0, 3)
    part = load_model(gguf_path, "fp32", "cpu", shard=(0, 3))[0]
    _assert_same(whole, part)


def _assert_same(whole, part):
    assert part.tp_shard == whole.tp_shard and part.config == whole.config
    a, b = whole.state_dict(), part.state_dict()
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    for la, lb in zip(whole.layers, part.layers):
        assert (la.self_attn.n_heads, la.self_attn.n_kv) == (lb.self_attn.n_heads, lb.self_attn.n_kv)
