"""The engine on the real Triton attention kernels (write_kv, paged decode, paged prefill), run by
Triton's interpreter on the CPU (on the GPU where there is one): the same greedy tokens as the
PyTorch path, with fp16/int8/int4 KV, chunked prefill mixing decodes and prompt chunks, and
decode replayed through the graph buffers with no host-side lengths. The tiny dummy preset keeps
the interpreter fast."""
import os

from lowbit.kernels.testing import device_for_tests

DEV = device_for_tests()  # before any kernel module is imported: it picks GPU or interpreter
# fp32 dots in IEEE fp32 on a GPU too (Triton's default there is tf32, the interpreter's is fp32):
# with int4 KV a tf32-sized difference in attention can flip a code, and so a token, of the tiny
# random model, whose logits lie close together. Read when the kernels compile (part of their cache key).
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

import pytest  # noqa: E402
import torch  # noqa: E402
from test_engine_graphs import ReplayByRecompute  # noqa: E402

from lowbit.engine.llm import LLM  # noqa: E402
from lowbit.engine.sampling_params import SamplingParams  # noqa: E402
from lowbit.layers.paged_kv_cache import load_attention_kernels  # noqa: E402
from lowbit.loading.dummy import build_dummy_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return build_dummy_model("tiny", dtype="fp32", device=DEV, seed=3)


def _prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 512, (n,), generator=g).tolist() for n in (5, 13, 22)]


def _llm(tiny, kernels: bool, graphs: bool = False, **kw):
    llm = LLM(tiny, max_model_len=48, block_size=8, num_kv_blocks=32, max_batch_size=4,
              max_num_batched_tokens=16, enforce_eager=True, **kw)
    runner = llm.engine.runner
    runner.cache.kernels = load_attention_kernels() if kernels else type(runner.cache.kernels)()
    if graphs:
        runner._capture_graphs(ReplayByRecompute)
        assert runner.graphs is not None, runner.graph_status
    return llm


@pytest.mark.parametrize("kv_bits", [16, 8, 4])
def test_real_kernels_give_the_pytorch_paths_tokens(tiny, kv_bits):
    kernels = load_attention_kernels()
    assert kernels.write_kv and kernels.decode and kernels.prefill, "a kernel module failed to import"
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    expected = [o.token_ids for o in _llm(tiny, False, kv_bits=kv_bits).generate(_prompts(), params)]
    if kv_bits == 16:  # eager decode, where the kernel is also given the host's longest context
        assert [o.token_ids for o in _llm(tiny, True, kv_bits=kv_bits).generate(_prompts(), params)] == expected
    ReplayByRecompute.replays.clear()
    llm = _llm(tiny, True, graphs=True, kv_bits=kv_bits)
    assert [o.token_ids for o in llm.generate(_prompts(), params)] == expected
    assert ReplayByRecompute.replays  # decode steps ran through the static buffers
