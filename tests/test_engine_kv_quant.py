"""int8 / int4 KV cache on the default model: what a token costs, what is stored and read back,
batch invariance with and without preemption, and how close int8 stays to full-precision KV.

Batch invariance with quantized KV is checked on an fp64 copy of the default model as well as
on the fp32 model for int8: a batched matmul differs from a single-row one in the last bits,
and once in a while that moves a value across a rounding boundary of its KV code. One int4
step is 1/15 of the token's range, enough to change a later greedy token; in fp64 the noise is
1e-16 and what the test sees is only the engine (paging, packing, preemption).
"""
import copy

import pytest
import torch

from lowbit.engine.llm import LLM
from lowbit.engine.sampling_params import SamplingParams
from lowbit.engine.sequence import Sequence
from lowbit.kernels.kv_quant import dequantize_kv_ref, quantize_kv_ref
from lowbit.layers.attention import gqa_attention
from lowbit.layers.paged_kv_cache import PagedAttentionMetadata, PagedKVCache

MAX_TOKENS = 10


@pytest.fixture(scope="module")
def smol64(smol):
    model, tok, ckpt = smol
    return copy.deepcopy(model).double(), tok, ckpt


def _llm(triple, **kw):
    kw = {"max_model_len": 128, "num_kv_blocks": 64, "max_batch_size": 8, **kw}
    return LLM(triple, **kw)


def _greedy(llm, prompts, max_tokens=MAX_TOKENS):
    return [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=max_tokens))]


# -- what a token costs -------------------------------------------------------------------------
@pytest.mark.parametrize("head_dim, int8_ratio, int4_ratio", [(128, 1.939, 3.765), (64, 1.882, 3.556)])
def test_bytes_per_token_count_codes_and_scales(head_dim, int8_ratio, int4_ratio):
    per = {bits: PagedKVCache.bytes_per_token(32, 8, head_dim, bits, torch.float16) for bits in (16, 8, 4)}
    assert per[16] == 2 * 32 * 8 * head_dim * 2
    assert per[8] == 2 * 32 * 8 * (head_dim + 4)  # codes + fp16 scale and zero per token and head
    assert per[16] / per[8] == pytest.approx(int8_ratio, abs=1e-3)
    assert per[16] / per[4] == pytest.approx(int4_ratio, abs=1e-3)
    for bits in (16, 8, 4):  # the allocated cache is what bytes_per_token says
        cache = PagedKVCache(32, 3, 16, 8, head_dim, bits, torch.float16, "cpu")
        assert cache.num_bytes == 3 * 16 * per[bits]


def test_an_odd_head_dim_cannot_pack_int4():
    from lowbit.errors import LowbitError

    with pytest.raises(LowbitError, match="odd"):
        PagedKVCache(1, 2, 4, 1, 7, 4, torch.float32, "cpu")


# -- what is stored and read back -----------------------------------------------------------------
def _random_cache(kv_bits, lens, sliding_window=None, seed=0):
    """A cache holding random keys/values for sequences of `lens` tokens in scattered blocks."""
    g = torch.Generator().manual_seed(seed)
    bs, kvh, hd, heads = 4, 2, 16, 4
    cache = PagedKVCache(1, 32, bs, kvh, hd, kv_bits, torch.float32, "cpu")
    order = torch.randperm(32, generator=g).tolist()
    tables, slots, kv = [], [], []
    for n in lens:
        blocks = [order.pop() for _ in range(-(-n // bs))]
        tables.append(blocks + [0] * (8 - len(blocks)))
        slots += [blocks[p // bs] * bs + p % bs for p in range(n)]
        kv.append((torch.randn(n, kvh, hd, generator=g) * 3, torch.randn(n, kvh, hd, generator=g)))
    k, v = torch.cat([a for a, _ in kv]), torch.cat([b for _, b in kv])
    meta = PagedAttentionMetadata(torch.tensor(slots), torch.tensor(tables, dtype=torch.int32),
                                  torch.tensor(lens, dtype=torch.int32), len(lens), [1] * len(lens), list(lens))
    cache.set_metadata(meta)
    cache.write(0, k, v)
    q = torch.randn(len(lens), heads, hd, generator=g)
    return cache, kv, q


@pytest.mark.parametrize("kv_bits", [16, 8, 4])
def test_pages_read_back_what_was_written_and_decode_attends_each_context(kv_bits):
    lens = [1, 7, 13, 4]
    cache, kv, q = _random_cache(kv_bits, lens)
    for i, (k, v) in enumerate(kv):
        got_k, got_v = cache.gather(0, cache.meta.block_tables[i], lens[i])
        if kv_bits != 16:  # the format's own round trip, exactly
            k = dequantize_kv_ref(*quantize_kv_ref(k, kv_bits), kv_bits)
            v = dequantize_kv_ref(*quantize_kv_ref(v, kv_bits), kv_bits)
        assert torch.equal(got_k, k.transpose(0, 1)) and torch.equal(got_v, v.transpose(0, 1))
    for window in (None, 5):
        out = cache.decode_attention(0, q, window)  # all sequences at once, padded and masked
        for i in range(len(lens)):
            k, v = cache.gather(0, cache.meta.block_tables[i], lens[i])
            alone = gqa_attention(q[i][None, :, None], k[None], v[None], window)[0, :, 0]
            torch.testing.assert_close(out[i], alone, atol=1e-5, rtol=1e-5)


def test_int8_error_is_within_half_a_code_step():
    cache, kv, _ = _random_cache(8, [16])
    k, _ = kv[0]
    got, _ = cache.gather(0, cache.meta.block_tables[0], 16)
    step = (k.amax(-1, keepdim=True) - k.amin(-1, keepdim=True)) / 255
    # half a step, plus what rounding the scale and zero to fp16 adds (0.55 steps at most here)
    assert ((got.transpose(0, 1) - k).abs() <= 0.6 * step).all()


# -- batch invariance -----------------------------------------------------------------------------
def _alone(triple, prompts, max_tokens=MAX_TOKENS, **kw):
    llm = _llm(triple, **kw)
    return [_greedy(llm, [p], max_tokens)[0] for p in prompts]


@pytest.mark.parametrize("kv_bits", [8, 4])
def test_quantized_kv_batch_equals_each_prompt_alone_with_and_without_preemption(smol64, prompt_ids, kv_bits):
    prompts, n = prompt_ids[1:4], 8  # fp64 reads 1 GB of weights a step: fewer, shorter runs
    alone = _alone(smol64, prompts, n, kv_bits=kv_bits)
    assert _greedy(_llm(smol64, kv_bits=kv_bits), prompts, n) == alone
    # 12 blocks of 4 tokens hold one max_model_len sequence, not three prompts with their outputs
    small = _llm(smol64, kv_bits=kv_bits, block_size=4, num_kv_blocks=12, max_model_len=48)
    assert _greedy(small, prompts, n) == alone
    assert small.engine.scheduler.num_preemptions > 0


def test_int8_kv_batch_equals_alone_on_the_fp32_model(smol, prompt_ids):
    prompts = [prompt_ids[i] for i in (0, 1, 3)]
    alone = _alone(smol, prompts, kv_bits=8)
    assert _greedy(_llm(smol, kv_bits=8), prompts) == alone
    small = _llm(smol, kv_bits=8, block_size=4, num_kv_blocks=10, max_model_len=40)
    assert _greedy(small, prompts) == alone and small.engine.scheduler.num_preemptions > 0


# -- how close quantized KV stays -----------------------------------------------------------------
def _teacher_forced_logits(smol, ids, kv_bits):
    """Logits at every position of `ids`, read as one prompt through the paged cache, so every
    position attends over keys and values that went through the cache (quantized for 8 / 4)."""
    llm = _llm(smol, kv_bits=kv_bits, max_model_len=256)
    runner = llm.engine.runner
    seq = Sequence("t", ids, SamplingParams())
    llm.engine.block_manager.allocate(seq, len(ids))
    step = runner.prepare([seq], [len(ids)])
    runner.cache.set_metadata(runner.metadata(step))
    with torch.inference_mode():
        return runner._forward(torch.tensor(ids), torch.arange(len(ids)), runner.cache, None)


@pytest.fixture(scope="module")
def wiki_ids(smol):
    from lowbit.eval.datasets import load_text

    text = load_text("wikitext2", "eval")[:4000]
    return smol[1].encode(text)[:160]


def test_int8_kv_stays_close_to_full_precision(smol, wiki_ids, prompt_ids):
    ids = wiki_ids
    target = torch.tensor(ids[1:])
    ref = _teacher_forced_logits(smol, ids, 16)
    nll_ref = torch.nn.functional.cross_entropy(ref[:-1], target).item()
    stats = {}
    for bits in (8, 4):
        lg = _teacher_forced_logits(smol, ids, bits)
        kl = torch.nn.functional.kl_div(lg.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                        reduction="none").sum(-1)
        agree = (lg.argmax(-1) == ref.argmax(-1)).float().mean().item()
        stats[bits] = (agree, kl.mean().item(), torch.nn.functional.cross_entropy(lg[:-1], target).item() - nll_ref)
    # measured on this model: int8 99% top-1 agreement, KL 3e-4, +0.001 nats; int4 80%, 0.11, +0.08
    agree, kl, dnll = stats[8]
    assert agree >= 0.97 and kl < 5e-3 and abs(dnll) < 0.01, stats
    agree, kl, dnll = stats[4]
    assert agree >= 0.6 and kl < 0.5 and dnll < 0.3, stats
    # and in use: greedy answers to the test prompts are the same tokens as with fp32 KV
    assert _greedy(_llm(smol, kv_bits=8), prompt_ids) == _greedy(_llm(smol), prompt_ids)


# -- bad requests --------------------------------------------------------------------------------
def test_an_overlong_prompt_fails_alone_with_quantized_kv(smol, prompt_ids):
    llm = _llm(smol, kv_bits=8, max_model_len=32)
    long = list(range(1, 41))
    outs = llm.generate([prompt_ids[0], long, prompt_ids[2]], SamplingParams(max_tokens=MAX_TOKENS))
    assert outs[1].finish_reason == "error" and outs[1].token_ids == []
    msg = str(outs[1].error)
    assert "40 tokens" in msg and "max_model_len=32" in msg
    assert [outs[0].token_ids, outs[2].token_ids] == _alone(smol, [prompt_ids[0], prompt_ids[2]], kv_bits=8,
                                                            max_model_len=32)
    assert llm.engine.block_manager.num_free_blocks == 64
