"""Writing and loading AWQ / GPTQ checkpoints on a tiny random Llama: every bit width, act-order
g_idx, gptq_v2, modules_to_not_convert, bad configs and shapes, failed writes."""
import errno
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit.config import ModelConfig
from lowbit.errors import LowbitError
from lowbit.layers.formats import method_for_checkpoint
from lowbit.formats import gptq_format
from lowbit.loading.loader import build_model, open_checkpoint
from lowbit.models.llama import LlamaModel
from lowbit.quant.driver import LINEAR_NAMES, set_weight
from lowbit.quant.export import save_quantized
from lowbit.quant.gptq import gptq_quantize
from lowbit.quant.rtn import quantize_rtn

CFG = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)


class StubTokenizer:
    bos_token_id, eos_token_id = 1, 2

    def save(self, out_dir):
        (out_dir / "tokenizer.json").write_text("{}")


def tiny_quantized(fmt, bits, group_size=32, act_order=False, symmetric=False, skip=()):
    """A random tiny model whose linears are replaced by their quantized values (scales and all other
    tensors rounded to fp16, as the checkpoint stores them), and the QuantizedWeight of each."""
    torch.manual_seed(bits * 10 + act_order)
    net = LlamaModel(CFG, fused=False)  # quantizers work on each projection by its checkpoint name
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_((1 + 0.1 * torch.randn_like(p)) if "norm" in name else 0.2 * torch.randn_like(p))
            p.copy_(p.half().float())
    qweights = {}
    for i, layer in enumerate(net.layers):
        for n in LINEAR_NAMES:
            if n in skip:
                continue
            lin = layer.get_submodule(n)
            if act_order:
                x = torch.randn(256, lin.in_features) * torch.linspace(0.1, 3, lin.in_features)[torch.randperm(lin.in_features)]
                qw = gptq_quantize(lin.weight.data, 2 * x.T @ x / 256, bits, group_size, symmetric, act_order=True)
            else:
                qw = quantize_rtn(lin.weight.data, bits, group_size, symmetric)
            qw.scales = qw.scales.half().float()
            set_weight(lin, qw)
            qweights[f"model.layers.{i}.{n}"] = qw
    return net, qweights


def load(path, fused=True):
    return build_model(open_checkpoint(path), torch.float32, "cpu", fused=fused)


CASES = [("awq", 4, False, False), ("awq", 4, False, True), ("gptq", 2, False, False), ("gptq", 3, True, False),
         ("gptq", 4, True, True), ("gptq", 8, False, False)]


@pytest.mark.parametrize("fmt,bits,act_order,symmetric", CASES,
                         ids=["awq", "awq-sym", "gptq2", "gptq3-actorder", "gptq4-actorder-sym", "gptq8"])
def test_written_checkpoint_loads_to_the_same_model(tmp_path, fmt, bits, act_order, symmetric):
    net, qweights = tiny_quantized(fmt, bits, act_order=act_order, symmetric=symmetric)
    out = save_quantized(tmp_path / "q", net, qweights, fmt, StubTokenizer())
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == fmt and cfg["bits"] == bits and cfg["group_size"] == 32
    assert cfg.get("desc_act", False) == act_order and cfg.get("sym", symmetric) == symmetric
    assert cfg.get("zero_point", not symmetric) == (not symmetric)
    ours = load(out, fused=False)  # one QLinear per checkpoint name
    for name, qw in qweights.items():
        lin = ours.get_submodule(name)
        assert lin.method.name == fmt
        assert torch.equal(lin.dequantized_weight(), qw.dequantize()), name
        assert (lin.g_idx_k is not None) == (qw.g_idx is not None)  # a natural g_idx takes the fast path
    ids = torch.randint(0, CFG.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids) - net(ids)).abs().max().item() < 1e-5
        # what inference runs: q/k/v and gate/up merged at load from the same tensors
        assert (load(out)(ids) - net(ids)).abs().max().item() < 1e-5


def test_gptq_v2_and_modules_to_not_convert(tmp_path):
    net, qweights = tiny_quantized("gptq", 4, skip=("self_attn.o_proj",))
    out = save_quantized(tmp_path / "q", net, qweights, "gptq", StubTokenizer())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["modules_to_not_convert"] == [
        "model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    # re-store the zeros as gptq_v2 (no minus one): the same model must come back
    tensors = load_file(out / "model.safetensors")
    for name in [n for n in tensors if n.endswith(".qzeros")]:
        zeros = gptq_format.unpack_last(tensors[name], 4) + 1
        tensors[name] = gptq_format.pack_last(zeros, 4)
    save_file(tensors, out / "model.safetensors")
    cfg["quantization_config"]["checkpoint_format"] = "gptq_v2"
    (out / "config.json").write_text(json.dumps(cfg))
    ours = load(out)
    assert ours.layers[0].self_attn.o_proj.method.name == "dense"
    assert ours.layers[0].self_attn.qkv_proj.method.name == "gptq"  # q/k/v merged at load
    ids = torch.randint(0, CFG.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids) - net(ids)).abs().max().item() < 1e-5


@pytest.mark.parametrize("quant,needle", [
    ({"quant_method": "awq", "bits": 3, "group_size": 64, "version": "gemm"}, "4-bit codes only"),
    ({"quant_method": "awq", "bits": 4, "group_size": 64, "version": "gemv"}, "'gemv'"),
    ({"quant_method": "gptq", "bits": 7, "group_size": 64}, "bits 7"),  # 5 and 6: lowbit's mixed checkpoints
    ({"quant_method": "gptq", "bits": 4, "group_size": 64, "checkpoint_format": "marlin"}, "'marlin'"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 0}, "group_size 0"),
    ({"quant_method": "bitsandbytes"}, "'bitsandbytes' is not supported"),
])
def test_unsupported_quantization_config_is_refused(quant, needle):
    with pytest.raises(LowbitError, match=needle):
        method_for_checkpoint(quant, "some/dir")


def test_legacy_keys_and_skips():
    method_for = method_for_checkpoint({"quant_method": "awq", "w_bit": 4, "q_group_size": 32, "version": "GEMM",
                                        "modules_to_not_convert": ["o_proj"]})
    assert method_for("model.layers.0.self_attn.o_proj", 64, 64) is None
    m = method_for("model.layers.0.self_attn.q_proj", 64, 64)
    assert (m.name, m.bits, m.group_size) == ("awq", 4, 32)


def test_group_size_that_does_not_divide_a_layer_is_refused(tmp_path):
    net, qweights = tiny_quantized("gptq", 4)
    out = save_quantized(tmp_path / "q", net, qweights, "gptq", StubTokenizer())
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["group_size"] = 48
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LowbitError, match=r"model.layers.0.self_attn.qkv_proj \(q_proj\+k_proj\+v_proj\): .*group_size 48 does not divide "
                                         r"in_features 64"):
        load(out)


def test_shape_mismatch_names_file_tensor_and_shapes(tmp_path):
    net, qweights = tiny_quantized("gptq", 4)
    out = save_quantized(tmp_path / "q", net, qweights, "gptq", StubTokenizer())
    tensors = load_file(out / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.qweight"
    tensors[name] = tensors[name][:-1].clone()
    save_file(tensors, out / "model.safetensors")
    with pytest.raises(LowbitError) as e:
        load(out)
    msg = str(e.value)
    assert "model.safetensors" in msg and name in msg and "(15, 64)" in msg and "(16, 64)" in msg


def test_writer_refuses_bits_the_layout_cannot_hold(tmp_path):
    net, qweights = tiny_quantized("gptq", 3)
    with pytest.raises(LowbitError, match="--format awq stores 4-bit codes"):
        save_quantized(tmp_path / "q", net, qweights, "awq", StubTokenizer())
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("err", [OSError(errno.ENOSPC, "No space left on device"),
                                 OSError(errno.EIO, "Input/output error")], ids=["enospc", "eio"])
def test_failed_write_leaves_nothing_and_names_the_directory(tmp_path, monkeypatch, err):
    import lowbit.quant.export as export

    net, qweights = tiny_quantized("awq", 4)

    def fail(out, tensors, metadata=None):
        (out / "model.safetensors").write_bytes(b"partial")
        raise err

    monkeypatch.setattr(export, "write_tensors", fail)
    target = tmp_path / "q"
    with pytest.raises(LowbitError, match=str(target)):
        save_quantized(target, net, qweights, "awq", StubTokenizer())
    assert list(tmp_path.iterdir()) == []  # neither the directory nor its hidden partial sibling


def test_dequantize_on_cpu_matches_in_fp16_and_bf16(tmp_path):
    net, qweights = tiny_quantized("gptq", 4, act_order=True)
    out = save_quantized(tmp_path / "q", net, qweights, "gptq", StubTokenizer())
    ref = load(out)
    x = torch.randn(3, 64)
    for dtype, tol in ((torch.float16, 1e-2), (torch.bfloat16, 5e-2)):
        low = build_model(open_checkpoint(out), dtype, "cpu")
        lin, lin_ref = low.layers[0].self_attn.q_proj, ref.layers[0].self_attn.q_proj  # act-order g_idx differ: unmerged
        y = lin(x.to(dtype))
        assert y.dtype == dtype
        assert (y.float() - lin_ref(x)).abs().max().item() < tol * lin_ref(x).abs().max().item()
