"""The CPU matmul of AWQ / GPTQ layers (lowbit/layers/cpu_weights.py: the weight dequantized once
and kept) against the reference: dequantize the whole weight on every call, then F.linear."""
import pytest
import torch
from torch.nn import functional as F

from lowbit.formats import awq_format, gptq_format
from lowbit.layers import cpu_weights
from lowbit.layers.linear import QLinear
from lowbit.layers.quantized_linear import AWQLinearMethod, GPTQLinearMethod, dequantize_codes

def _codes(out_f, in_f, group_size, seed):
    g = torch.Generator().manual_seed(seed)
    n_groups = in_f // group_size
    codes = torch.randint(0, 16, (out_f, in_f), generator=g).to(torch.uint8)
    scales = (torch.rand(out_f, n_groups, generator=g) * 0.02 + 0.002).half()  # as a checkpoint stores them
    zeros = torch.randint(0, 16, (out_f, n_groups), generator=g).to(torch.int32)
    return codes, scales, zeros


def _awq_layer(out_f, in_f, group_size, seed, bias=False):
    """A QLinear in the AutoAWQ GEMM layout, loaded as the loader does (tensors, then after_load)."""
    codes, scales, zeros = _codes(out_f, in_f, group_size, seed)
    layer = QLinear(in_f, out_f, bias, AWQLinearMethod(4, group_size, prefix="test"), torch.float32)
    _fill(layer, awq_format.pack(codes, scales.float(), zeros), seed)
    return layer


def _fill(layer, tensors, seed):
    for name, t in tensors.items():
        getattr(layer, name).copy_(t)
    if layer.bias is not None:
        layer.bias.copy_(torch.randn(layer.out_features, generator=torch.Generator().manual_seed(seed + 1)))
    layer.method.after_load(layer)


def _reference(layer, x):
    return F.linear(x, layer.dequantized_weight(), layer.bias)


def _close(y, ref):
    # fp32 sums of 576..1536 products in another order: a few ulp of the largest partial sums
    assert (y - ref).abs().max().item() <= 2e-5 * ref.abs().max().item() + 1e-6


def _kept(layer, dtype=torch.float32):
    return layer.__dict__["_cpu_dense_weight"][dtype].value


def test_packed_layer_keeps_its_dequantized_weight_with_the_references_numerics(monkeypatch):
    layer = _awq_layer(960, 576, 64, seed=0, bias=True)
    decode, prompt = torch.randn(1, 1, 576), torch.randn(1, 40, 576)
    assert torch.equal(layer(decode), _reference(layer, decode))
    assert cpu_weights.last_path(layer) == "cache"
    kept = _kept(layer)
    assert torch.equal(layer(prompt), _reference(layer, prompt))
    assert _kept(layer) is kept  # made once, for decode and prompts alike
    monkeypatch.setenv(cpu_weights.MODE_ENV, "dequantize")
    assert torch.equal(layer(decode), _reference(layer, decode))
    assert cpu_weights.last_path(layer) == "dequantize"


def test_decode_reads_an_fp16_copy_and_prompts_the_exact_weight():
    """In the engine's decode steps a small call (<= 16 rows) reads an fp16 copy of the
    dequantized weight (half the bytes of a bandwidth-bound step): within fp16 rounding of the
    reference; a prompt, and any call outside a decode step, stays exact. A dense weight gets the
    fp16 path only where fp16 holds it exactly."""
    from lowbit.layers.linear import dense_linear

    layer = _awq_layer(960, 576, 64, seed=0, bias=True)
    decode, prompt = torch.randn(1, 2, 576), torch.randn(1, 40, 576)
    assert torch.equal(layer(decode), _reference(layer, decode))  # not a decode step: exact
    with cpu_weights.decode_step():
        _decode_step_checks(layer, decode, prompt, dense_linear)


def _decode_step_checks(layer, decode, prompt, dense_linear):
    y, ref = layer(decode), _reference(layer, decode)
    assert cpu_weights.last_path(layer) == "cache-fp16" and not torch.equal(y, ref)
    assert (y - ref).norm() / ref.norm() < 2e-3
    kept = _kept(layer, torch.float16)
    assert kept.dtype == torch.float16 and layer(decode) is not None and _kept(layer, torch.float16) is kept
    assert torch.equal(layer(prompt), _reference(layer, prompt)) and cpu_weights.last_path(layer) == "cache"

    exact16 = torch.randn(64, 576).half().float()  # as a checkpoint stored in fp16 loads
    x = torch.randn(1, 576)
    assert torch.equal(dense_linear(x, exact16), F.linear(x.half(), exact16.half()).float())
    fp32_only = torch.randn(64, 576)  # fp16 would round it: stays exact
    assert torch.equal(dense_linear(x, fp32_only), F.linear(x, fp32_only))


def test_int8_decode_reads_an_int8_copy_of_packed_and_dense_weights(monkeypatch):
    """LOWBIT_CPU_DECODE=int8: decode calls read a per-row int8 copy through PyTorch's int8
    weight-only matmul (bf16 activations): close to the exact product, not equal; made once and
    kept; prompts stay exact. The dense weight (e.g. a tied output head) takes it too."""
    from lowbit.layers.linear import dense_linear

    monkeypatch.setenv(cpu_weights.DECODE_ENV, "int8")
    layer = _awq_layer(960, 576, 64, seed=1, bias=True)
    decode, prompt = torch.randn(1, 2, 576), torch.randn(1, 40, 576)
    with cpu_weights.decode_step():
        y, ref = layer(decode), _reference(layer, decode)
        assert cpu_weights.last_path(layer) == "cache-int8" and not torch.equal(y, ref)
        assert (y - ref).norm() / ref.norm() < 2e-2
        codes, scale = _kept(layer, torch.int8)
        assert codes.dtype == torch.int8 and codes.shape == (960, 576) and int(codes.abs().max()) == 127
        layer(decode)
        assert _kept(layer, torch.int8)[0] is codes  # made once
        assert torch.equal(layer(prompt), _reference(layer, prompt)) and cpu_weights.last_path(layer) == "cache"
        w, x = torch.randn(64, 576), torch.randn(1, 576)
        y = dense_linear(x, w)
        assert not torch.equal(y, F.linear(x, w)) and (y - F.linear(x, w)).norm() / F.linear(x, w).norm() < 2e-2
    monkeypatch.setenv(cpu_weights.DECODE_ENV, "int4")
    with pytest.raises(Exception, match="expected one of fp16, fp32, int8"):
        with cpu_weights.decode_step():
            pass


def test_act_order_layers_keep_the_dequantized_weight_too():
    """GPTQ act-order (a g_idx that is not column // group): dequantized once, kept, exact."""
    out_f, in_f, group_size, bits = 64, 128, 32, 4
    codes, scales, zeros = _codes(out_f, in_f, group_size, seed=3)
    zeros = zeros.clamp(1, 15)  # v1 stores zero - 1 in 4 bits
    g_idx = (torch.randperm(in_f, generator=torch.Generator().manual_seed(4)) // group_size).to(torch.int32)
    layer = QLinear(in_f, out_f, False, GPTQLinearMethod(bits, group_size, prefix="test"), torch.float32)
    _fill(layer, gptq_format.pack(codes, scales.float(), zeros, bits, group_size, g_idx), seed=3)
    assert layer.g_idx_k is not None
    x = torch.randn(1, 1, in_f)
    assert torch.equal(layer(x), _reference(layer, x))
    assert cpu_weights.last_path(layer) == "cache"
    kept = _kept(layer)
    layer(x)
    assert _kept(layer) is kept  # made once


@pytest.mark.parametrize("mode", ["auto", "cache"])
def test_kept_weight_is_remade_when_the_weights_are_reloaded(mode, monkeypatch):
    monkeypatch.setenv(cpu_weights.MODE_ENV, mode)
    layer = _awq_layer(192, 576, 64, seed=5)
    x = torch.randn(1, 1, 576)
    before = layer(x)
    # load another checkpoint's tensors into the same layer, as the loader does
    codes, scales, zeros = _codes(192, 576, 64, seed=6)
    _fill(layer, awq_format.pack(codes, scales.float(), zeros), seed=6)
    after = layer(x)
    assert not torch.allclose(before, after)
    _close(after, _reference(layer, x))
    # an in-place change of the compute form is seen too
    layer.codes_nxk.copy_(15 - layer.codes_nxk)
    _close(layer(x), _reference(layer, x))
    cpu_weights.drop_kept(layer)
    _close(layer(x), _reference(layer, x))


def test_an_unknown_mode_says_which_are_known(monkeypatch):
    from lowbit.errors import LowbitError

    monkeypatch.setenv(cpu_weights.MODE_ENV, "fast")
    with pytest.raises(LowbitError, match="auto, dequantize, cache"):
        _awq_layer(64, 256, 64, seed=7)(torch.randn(1, 256))
