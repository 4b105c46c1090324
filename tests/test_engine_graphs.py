"""The CUDA path of the engine, run on the CPU: the Triton kernels' interfaces filled by plain
PyTorch stand-ins that check what they are given, and decode "graphs" that replay by recomputing
on the static buffers, so the padding, the scratch block and the buffer refills are exercised
exactly as on the GPU. Only the capture itself (torch.cuda.CUDAGraph) needs a device.

Runs on the tiny dummy preset in fp64: what is checked is the plumbing, and in fp64 the stand-ins'
different summation order cannot move an int8 KV code (see test_engine_kv_quant.py).
"""
import pytest
import torch

from lowbit.engine.cuda_graphs import DecodeGraphs, graph_batch_sizes
from lowbit.engine.llm import LLM
from lowbit.engine.sampling_params import SamplingParams
from lowbit.kernels.kv_quant import dequantize_kv_ref, quantize_kv_ref
from lowbit.layers.attention import gqa_attention
from lowbit.layers.paged_kv_cache import AttentionKernels
from lowbit.layers.rotary import apply_rotary
from lowbit.loading.dummy import build_dummy_model

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def tiny64():
    """The tiny preset in fp64."""
    model, tok, ckpt = build_dummy_model("tiny", dtype="fp32", device="cpu", seed=1)
    return model.double(), tok, ckpt


@pytest.fixture(scope="module")
def prompt_ids():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 512, (n,), generator=g).tolist() for n in (22, 11, 18)]


# -- stand-ins with the kernels' exact signatures -------------------------------------------------
CALLS: dict[str, int] = {}


def _check_cache(k_cache, kv_bits, k_scale_zero):
    assert k_cache.dim() == 4  # [num_blocks, block_size, kv_heads, head_dim or head_dim // 2]
    if kv_bits == 16:
        assert k_scale_zero is None
    else:
        assert k_cache.dtype == torch.uint8 and k_scale_zero.dtype == torch.float16
        assert k_scale_zero.shape == (*k_cache.shape[:3], 2)


def write_kv(k, v, k_cache, v_cache, slot_mapping, kv_bits=16, k_scale_zero=None, v_scale_zero=None, rope=None):
    CALLS["write_kv"] = CALLS.get("write_kv", 0) + 1
    assert k.dim() == 3 and slot_mapping.dtype == torch.int64 and slot_mapping.shape == (k.shape[0],)
    _check_cache(k_cache, kv_bits, k_scale_zero)
    if rope is not None:  # as the kernel: q rotated in place, k rotated as it is stored
        CALLS["rope"] = CALLS.get("rope", 0) + 1
        q, cos, sin = rope
        assert q.dim() == 3 and q.shape[1] % k.shape[1] == 0 and cos.shape == sin.shape == (k.shape[0], k.shape[2])
        q_rot, k = (x[0] for x in apply_rotary(q[None], k[None], cos[None], sin[None]))
        q.copy_(q_rot)
    for x, cache, sz in ((k, k_cache, k_scale_zero), (v, v_cache, v_scale_zero)):
        flat = cache.view(-1, *cache.shape[2:])
        if kv_bits == 16:
            flat.index_copy_(0, slot_mapping, x.to(cache.dtype))
        else:
            codes, s = quantize_kv_ref(x, kv_bits)
            flat.index_copy_(0, slot_mapping, codes)
            sz.view(-1, *sz.shape[2:]).index_copy_(0, slot_mapping, s)


def _context(cache, sz, table, length, kv_bits, dtype):
    """One sequence's first `length` tokens -> [kv_heads, length, head_dim]."""
    bs = cache.shape[1]
    blocks = table[:-(-length // bs)].long()
    x = cache[blocks]
    if kv_bits != 16:
        x = dequantize_kv_ref(x, sz[blocks], kv_bits, dtype)
    return x.flatten(0, 1)[:length].transpose(0, 1).to(dtype)


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, *, kv_bits=16, k_scale_zero=None,
                           v_scale_zero=None, sm_scale=None, sliding_window=None, max_context_len=None):
    CALLS["decode"] = CALLS.get("decode", 0) + 1
    s = q.shape[0]
    if max_context_len is not None:  # a host-side bound, given only outside a graph
        CALLS["hinted"] = CALLS.get("hinted", 0) + 1
        assert max_context_len >= int(context_lens.max()) and not ReplayByRecompute.replaying
    assert q.dim() == 3 and block_tables.dtype == torch.int32 and context_lens.dtype == torch.int32
    assert block_tables.shape[0] == s and context_lens.shape == (s,)
    _check_cache(k_cache, kv_bits, k_scale_zero)
    out = torch.empty_like(q)
    for i in range(s):  # reads lengths from the device tensor, as a kernel does
        n = int(context_lens[i])
        k = _context(k_cache, k_scale_zero, block_tables[i], n, kv_bits, q.dtype)
        v = _context(v_cache, v_scale_zero, block_tables[i], n, kv_bits, q.dtype)
        out[i] = gqa_attention(q[i][None, :, None], k[None], v[None], sliding_window)[0, :, 0]
    return out


def paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, *, kv_bits=16,
                            k_scale_zero=None, v_scale_zero=None, sm_scale=None, sliding_window=None,
                            max_seqlen_q=None):
    CALLS["prefill"] = CALLS.get("prefill", 0) + 1
    s = context_lens.shape[0]
    assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_q.shape == (s + 1,) and int(cu_seqlens_q[-1]) == q.shape[0]
    assert max_seqlen_q == int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())  # the host's bound, always given
    _check_cache(k_cache, kv_bits, k_scale_zero)
    out = torch.empty_like(q)
    for i in range(s):
        a, b, n = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1]), int(context_lens[i])
        k = _context(k_cache, k_scale_zero, block_tables[i], n, kv_bits, q.dtype)
        v = _context(v_cache, v_scale_zero, block_tables[i], n, kv_bits, q.dtype)
        out[a:b] = gqa_attention(q[a:b].transpose(0, 1)[None], k[None], v[None], sliding_window)[0].transpose(0, 1)
    return out


STAND_INS = AttentionKernels(write_kv=write_kv, decode=paged_decode_attention, prefill=paged_prefill_attention)


class ReplayByRecompute(DecodeGraphs):
    """A "graph" that replays by running the step again on the static buffers, as captured."""

    replays: dict[int, int] = {}
    replaying = False

    def _capture(self, b):
        meta = self.cache.meta

        def replay():
            ReplayByRecompute.replays[b] = ReplayByRecompute.replays.get(b, 0) + 1
            self.cache.set_metadata(meta)
            ReplayByRecompute.replaying = True
            try:
                logits = self.forward(self.input_ids[:b], self.positions[:b])
            finally:
                ReplayByRecompute.replaying = False
            return logits, logits.argmax(-1)

        return replay


def _llm(triple, kernels=None, graphs=False, **kw):
    kw = {"max_model_len": 64, "num_kv_blocks": 64, "max_batch_size": 8, **kw}
    llm = LLM(triple, **kw)
    runner = llm.engine.runner
    if kernels is not None:
        runner.cache.kernels = kernels
    if graphs:
        runner._capture_graphs(ReplayByRecompute)
        assert runner.graphs is not None, runner.graph_status
    return llm


def _greedy(llm, prompts):
    return [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))]


def test_graph_batch_sizes():
    assert graph_batch_sizes(64) == [1, 2, 4, 8, 16, 32, 64]
    assert graph_batch_sizes(48) == [1, 2, 4, 8, 16, 32, 48]
    assert graph_batch_sizes(1) == [1]


@pytest.mark.parametrize("kv_bits", [16, 8])
def test_kernel_path_and_padded_graph_replay_equal_the_pytorch_path(tiny64, prompt_ids, kv_bits):
    expected = _greedy(_llm(tiny64, kv_bits=kv_bits), prompt_ids)
    CALLS.clear()
    assert _greedy(_llm(tiny64, STAND_INS, kv_bits=kv_bits), prompt_ids) == expected
    assert CALLS["write_kv"] and CALLS["rope"] and CALLS["decode"] and CALLS["prefill"] and CALLS["hinted"]

    ReplayByRecompute.replays.clear()
    llm = _llm(tiny64, STAND_INS, graphs=True, kv_bits=kv_bits, max_batch_size=4)
    assert llm.engine.runner.graphs.sizes == [1, 2, 4]
    assert _greedy(llm, prompt_ids) == expected
    assert ReplayByRecompute.replays.get(4)  # three sequences ran in the graph of four, padded
    assert _greedy(llm, prompt_ids[:1]) == expected[:1] and ReplayByRecompute.replays.get(1)


def test_graph_replay_with_preemption_and_the_scratch_block(tiny64, prompt_ids):
    expected = _greedy(_llm(tiny64), prompt_ids)
    llm = _llm(tiny64, STAND_INS, graphs=True, block_size=4, num_kv_blocks=16, max_batch_size=4)
    runner = llm.engine.runner
    # the padding rows' block is the cache's last, which the block manager never hands out
    assert runner.cache.num_blocks == llm.engine.block_manager.num_blocks + 1 == runner.scratch_block + 1
    ReplayByRecompute.replays.clear()
    assert _greedy(llm, prompt_ids) == expected
    assert llm.engine.scheduler.num_preemptions > 0 and sum(ReplayByRecompute.replays.values()) > 0
    assert runner.cache.k[0][runner.scratch_block].abs().sum() > 0  # padding rows wrote there, not elsewhere


def test_graphs_stay_off_without_a_decode_kernel_and_on_the_cpu(smol):
    llm = LLM(smol, max_model_len=64, num_kv_blocks=16)
    assert llm.engine.runner.graphs is None and llm.engine.runner.graph_status == "off: CPU"
    llm.engine.runner._capture_graphs(ReplayByRecompute)  # the PyTorch decode reads host-side lengths
    assert llm.engine.runner.graphs is None and "no paged decode kernel" in llm.engine.runner.graph_status


def test_a_failed_capture_falls_back_to_eager(smol, caplog):
    class Broken(DecodeGraphs):
        def _capture(self, b):
            raise RuntimeError("operation not permitted when stream is capturing")

    llm = LLM(smol, max_model_len=64, num_kv_blocks=16)
    llm.engine.runner.cache.kernels = AttentionKernels(decode=paged_decode_attention)
    with caplog.at_level("WARNING"):
        llm.engine.runner._capture_graphs(Broken)
    assert llm.engine.runner.graphs is None and "capture failed" in llm.engine.runner.graph_status
    assert "decoding eagerly" in caplog.text
    assert llm.generate([1, 2, 3], SamplingParams(max_tokens=2))[0].finish_reason == "length"


def test_runs_of_steps_through_the_graph_path_equal_one_step_at_a_time(tiny64, prompt_ids):
    """DecodeGraphs.run_steps makes each next step's inputs from the static buffers (the token just
    chosen, position + 1, the slot from the block table: with 4-token blocks a run crosses blocks),
    three sequences in the padded graph of four; the engine takes runs of up to 8 with graphs."""
    expected = _greedy(_llm(tiny64), prompt_ids)
    llm = _llm(tiny64, STAND_INS, graphs=True, block_size=4, max_batch_size=4)
    assert llm.engine.num_scheduler_steps == 8
    ReplayByRecompute.replays.clear()
    steps = 0
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    finals = {}
    for ids in prompt_ids:
        llm.engine.add_request(ids, params, sink=lambda o: o.finished and finals.__setitem__(o.request_id, o))
    while llm.engine.has_unfinished():
        llm.engine.step()
        steps += 1
    assert [finals[k].token_ids for k in sorted(finals, key=int)] == expected
    # one prefill step, then one run of MAX_TOKENS - 1 decode steps replayed back to back
    assert steps == 2 and ReplayByRecompute.replays.get(4) == MAX_TOKENS - 1
