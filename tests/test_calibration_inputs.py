"""What each layer is calibrated on: the last layer's quantized outputs (true-sequential, the
default) or its full-precision outputs (`--next-inputs fp`, as llm-awq and AutoAWQ feed them)."""
from __future__ import annotations

import copy

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.loading.loader import build_model, open_checkpoint
from lowbit.quant.api import make_method, quantize
from lowbit.quant.driver import _first_inputs, quantize_model_layers


class _Seen(Exception):
    """Stops the driver once layer 1 has been handed its inputs."""


@pytest.fixture(scope="module")
def unfused(gguf_path):
    return build_model(open_checkpoint(gguf_path), torch.float32, "cpu", fused=False)


@pytest.mark.parametrize("fp", [False, True])
def test_second_layer_is_calibrated_on_the_inputs_asked_for(unfused, fp):
    net = copy.deepcopy(unfused)
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    first = _first_inputs(unfused, ids, "cpu", torch.float32, 16384)
    out_fp = first.forward(unfused.layers[0])
    seen = []

    def record(_module, args):  # layer 1's first input; its own quantization is not needed
        seen.append(args[0].clone())
        raise _Seen

    hook = net.layers[1].register_forward_pre_hook(record)
    try:
        with pytest.raises(_Seen):
            quantize_model_layers(net, make_method("gptq", 4, 64, False, True, True, next_inputs_fp=fp), ids, "cpu",
                                  log=None)
    finally:
        hook.remove()
    out_q = first.forward(net.layers[0])  # layer 0 as quantized
    gap = float((out_q[0] - out_fp[0]).norm() / out_fp[0].norm())
    assert gap > 1e-3  # 4 bits moved layer 0's outputs: the two choices differ
    want, other = (out_fp[0], out_q[0]) if fp else (out_q[0], out_fp[0])
    assert torch.allclose(seen[0], want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(seen[0], other, atol=1e-5, rtol=1e-5)


def test_next_inputs_is_checked_before_work():
    with pytest.raises(LowbitError, match="--next-inputs 'fp16'"):
        quantize("default", "awq", None, next_inputs="fp16")
    with pytest.raises(LowbitError, match="not rtn"):
        quantize("default", "rtn", None, next_inputs="fp")
