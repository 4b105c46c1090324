"""W8A8 (SmoothQuant int8, plain int8, FP8) on the CPU: the reference int8 matmul is the integer
product; SmoothQuant's smoothing leaves the full-precision model unchanged; a written
compressed-tensors checkpoint read back independently (safetensors + json, the spec's names, dtypes
and shapes) computes what our loaded layers compute; schemes we do not run are refused by name;
smoothing lowers a real layer's W8A8 output error on the default model."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from lowbit.errors import LowbitError
from lowbit.formats.compressed_tensors import W8A8Scheme
from lowbit.layers.w8a8_linear import int8_matmul_ref, quantize_int8_per_token, w8a8_int8_ref
from lowbit.models.llama import LlamaModel
from lowbit.models.presets import preset_config
from lowbit.quant.driver import LayerInputs, relative_error
from lowbit.quant.smoothquant import SmoothQuantMethod, channel_absmax, smooth_pairs, smoothing_scales, weight_absmax

INT8_DYNAMIC = W8A8Scheme("int", "channel", True)
SPEC_WEIGHTS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}
SPEC_INPUTS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the machine's two cores are shared (see tests/test_quantize.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(dtype=torch.float32, vocab_size=None, seed=0) -> LlamaModel:
    """The tiny preset (grouped-query attention: 4 heads, 2 KV heads), unfused, random weights with
    a few outlier input channels so that smoothing has something to move."""
    cfg = preset_config("tiny")
    if vocab_size:
        cfg = dataclasses.replace(cfg, vocab_size=vocab_size)
    gen = torch.Generator().manual_seed(seed)
    model = LlamaModel(cfg, dtype=dtype, fused=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + torch.rand(p.shape, generator=gen, dtype=dtype))
                p[:3] *= 20  # outlier channels in every norm's output
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.05)
    return model.eval()


# ---- the reference matmul -------------------------------------------------------------------
def test_int8_reference_matmul_is_the_integer_product():
    gen = torch.Generator().manual_seed(0)
    for m, n, k in [(3, 5, 7), (17, 64, 1536), (4, 32, 4096)]:
        a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
        b = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
        a[0] = -128  # the extremes: |sum| reaches 2^14 k
        b[0] = -128
        got = int8_matmul_ref(a, b.float())
        assert got.dtype == torch.int32
        assert torch.equal(got.long(), a.long() @ b.long().T)


def test_w8a8_layer_equals_a_direct_integer_computation():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(9, 576, generator=gen) * torch.linspace(0.1, 30, 576)  # channels of very different ranges
    w_q = torch.randint(-127, 128, (40, 576), generator=gen, dtype=torch.int8)
    w_scale = torch.rand(40, generator=gen) * 1e-3 + 1e-4
    xq, xs = quantize_int8_per_token(x)
    # per-token codes: the largest |x| of each token maps to +-127, every code within half a step
    assert xq.abs().amax(1).eq(127).all()
    assert ((xq.float() * xs[:, None] - x).abs() <= xs[:, None] / 2 + 1e-6).all()
    direct = (xq.long() @ w_q.long().T).double() * xs.double()[:, None] * w_scale.double()[None, :]
    got = w8a8_int8_ref(x, w_q.float(), w_scale)
    torch.testing.assert_close(got.double(), direct, rtol=1e-6, atol=0)


# ---- smoothing is exact in full precision ---------------------------------------------------
def test_smoothing_leaves_the_fp_model_unchanged():
    model = tiny_model(torch.float64)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(ids)
        h = model.embed(ids)
        cos, sin = model.rope(torch.arange(24)[None], h.dtype)
        moved = 0.0
        for layer in model.layers:
            feats = {}
            LayerInputs([h], cos, sin).capture(layer, ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj",
                                                       "mlp.down_proj"], lambda n, x: feats.setdefault(n, [x.clone()]))
            pairs = smooth_pairs(layer, cos, sin)
            assert [p.feat for p in pairs] == ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]
            assert pairs[1].expand is not None  # 4 query heads on 2 KV heads: o columns share v's scales
            for pair in pairs:
                s = smoothing_scales(pair.reduce(channel_absmax(feats[pair.feat])),
                                     pair.reduce(weight_absmax(pair.linears)), 0.5)
                moved = max(moved, float(s.max() / s.min()))
                pair.fold(s)
            h = layer(h, cos, sin)
        after = model(ids)
    assert moved > 4  # the scales did move something
    torch.testing.assert_close(after, before, rtol=1e-9, atol=1e-9)


# ---- the checkpoint -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def default_tokenizer(gguf_path):
    from lowbit.loading.loader import open_checkpoint

    return open_checkpoint(gguf_path).tokenizer()


def _as_written(model):
    """The quantizer's model with what the checkpoint stores in fp16 (embeddings, norms) rounded so."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("proj.weight"):
                p.copy_(p.half().float())
    return model


def _write(tmp_path, default_tokenizer, method, **kw):
    import lowbit

    model = tiny_model(vocab_size=default_tokenizer.vocab_size)  # the default model's tokenizer calibrates it
    res = lowbit.quantize(model, method, tmp_path / method, tokenizer=default_tokenizer, log=None,
                          calib_samples=2, calib_seqlen=64, **kw)
    return res, json.loads((res.out_dir / "config.json").read_text()), load_file(str(res.out_dir / "model.safetensors"))


def test_smoothquant_checkpoint_is_compressed_tensors_int8(tmp_path, default_tokenizer):
    from lowbit.loading.loader import load_model

    res, cfg, tensors = _write(tmp_path, default_tokenizer, "smoothquant", alpha="auto")
    q = cfg["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "int-quantized"
    assert q["quantization_status"] == "compressed" and q["ignore"] == ["lm_head"]
    (group,) = q["config_groups"].values()
    assert group["targets"] == ["Linear"]
    assert {k: group["weights"][k] for k in SPEC_WEIGHTS} == SPEC_WEIGHTS
    assert {k: group["input_activations"][k] for k in SPEC_INPUTS} == SPEC_INPUTS
    assert q["lowbit"]["alpha"] == "auto"
    linears = sorted(n[: -len(".weight_scale")] for n in tensors if n.endswith(".weight_scale"))
    assert len(linears) == 2 * 7
    for base in linears:
        w, s = tensors[f"{base}.weight"], tensors[f"{base}.weight_scale"]
        assert w.dtype == torch.int8 and s.dtype == torch.float32
        assert s.shape == (w.shape[0], 1) and int(w.abs().max()) == 127  # symmetric, full range per row
        assert f"{base}.input_scale" not in tensors  # dynamic activations store no scale
    assert tensors["model.layers.0.input_layernorm.weight"].dtype == torch.float16  # smoothed, kept dense

    # what our loaded (merged q/k/v) layer computes = the spec's arithmetic on the raw tensors
    model, _, _ = load_model(res.out_dir, "fp32", "cpu")
    qkv = model.layers[1].self_attn.qkv_proj
    x = torch.randn(5, qkv.in_features, generator=torch.Generator().manual_seed(3)) * 3
    xq, xs = quantize_int8_per_token(x)
    expect = [(xq.long() @ tensors[f"model.layers.1.self_attn.{p}.weight"].long().T).double() * xs.double()[:, None]
              * tensors[f"model.layers.1.self_attn.{p}.weight_scale"].double().T for p in ("q_proj", "k_proj", "v_proj")]
    torch.testing.assert_close(qkv(x).double(), torch.cat(expect, 1), rtol=1e-5, atol=1e-6)
    # and the whole model, read back, computes what the quantizer's simulation computes
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        loaded, simulated = model(ids), _as_written(res.model)(ids)
    assert float((loaded - simulated).abs().max()) < 1e-3 * float(simulated.abs().max())


def test_fp8_and_static_checkpoints(tmp_path, default_tokenizer):
    from lowbit.loading.loader import load_model

    _, cfg, tensors = _write(tmp_path, default_tokenizer, "fp8")
    q = cfg["quantization_config"]
    (group,) = q["config_groups"].values()
    assert q["format"] == "float-quantized" and group["weights"]["type"] == "float"
    assert group["input_activations"]["strategy"] == "token" and group["input_activations"]["dynamic"] is True
    w = tensors["model.layers.0.mlp.down_proj.weight"]
    assert w.dtype == torch.float8_e4m3fn and tensors["model.layers.0.mlp.down_proj.weight_scale"].shape == (w.shape[0], 1)
    assert float(w.float().abs().max()) == 448.0

    res, cfg, tensors = _write(tmp_path, default_tokenizer, "w8a8", act_scheme="static")
    acts = cfg["quantization_config"]["config_groups"]["group_0"]["input_activations"]
    assert acts["strategy"] == "tensor" and acts["dynamic"] is False
    scale = tensors["model.layers.0.self_attn.q_proj.input_scale"]
    assert scale.dtype == torch.float32 and scale.shape == (1,)
    model, _, _ = load_model(res.out_dir, "fp32", "cpu")
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        loaded, simulated = model(ids), _as_written(res.model)(ids)
    assert float((loaded - simulated).abs().max()) < 1e-3 * float(simulated.abs().max())


# ---- refusals -------------------------------------------------------------------------------
def _with_scheme(tmp_path, default_tokenizer, **changes):
    res, cfg, _ = _write(tmp_path, default_tokenizer, "w8a8")
    group = cfg["quantization_config"]["config_groups"]["group_0"]
    for where, value in changes.items():
        part, key = where.split("__")
        group[part][key] = value
    (res.out_dir / "config.json").write_text(json.dumps(cfg))
    return res.out_dir


def test_schemes_we_do_not_run_are_refused_by_name(tmp_path, default_tokenizer):
    from lowbit.loading.loader import load_model

    path = _with_scheme(tmp_path, default_tokenizer, input_activations__symmetric=False)
    with pytest.raises(LowbitError, match="asymmetric activations"):
        load_model(path, "fp32", "cpu")
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"].update(strategy="group", group_size=128)
    (path / "config.json").write_text(json.dumps(cfg))
    r = run_cli("generate", str(path), "-p", "hi", "--max-new-tokens", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "config_groups.group_0" in line and "strategy 'group'" in line, line
    with pytest.raises(LowbitError, match="SmoothQuant option"):
        import lowbit

        lowbit.quantize("default", "w8a8", None, alpha=0.8)


# ---- smoothing pays on the default model ------------------------------------------------------
def test_smoothquant_lowers_a_real_layers_w8a8_error(gguf_path):
    """Layer 2 of SmolLM2 (where its massive activation is made): smoothing searched on two windows
    gives a lower output error than plain W8A8 on two other windows."""
    import copy

    from lowbit.loading.loader import build_model, open_checkpoint
    from lowbit.quant.calibration import calibration_set
    from lowbit.quant.w8a8 import W8A8Method

    ckpt = open_checkpoint(gguf_path)
    model = build_model(ckpt, torch.float32, "cpu", fused=False)
    ids = calibration_set(ckpt.tokenizer(), "wikitext2", 4, 128, seed=0)
    with torch.no_grad():
        cos, sin = model.rope(torch.arange(128)[None], torch.float32)
        hidden = [model.embed(ids[:2]), model.embed(ids[2:])]
        for layer in model.layers[:2]:
            hidden = [layer(h, cos, sin) for h in hidden]
    calib, held_out = LayerInputs([hidden[0]], cos, sin), LayerInputs([hidden[1]], cos, sin)
    ref = held_out.forward(model.layers[2])
    errors = {}
    for name, method in {"w8a8": W8A8Method(INT8_DYNAMIC), "smoothquant": SmoothQuantMethod(INT8_DYNAMIC, None)}.items():
        layer = copy.deepcopy(model.layers[2])
        method.quantize_layer(layer, calib, "model.layers.2")
        errors[name] = relative_error(held_out.forward(layer), ref, held_out.hidden)
    assert errors["smoothquant"] < 0.8 * errors["w8a8"], errors


def test_cli_refuses_bad_w8a8_options_before_any_work(tmp_path):
    r = run_cli("quantize", "smoothquant", "default", "--work-dir", str(tmp_path / "o"), "--alpha", "1.5")
    assert r.returncode == 2 and "--alpha 1.5" in r.stderr.strip().splitlines()[-1], r.stderr
    r = run_cli("quantize", "rtn", "default", "--work-dir", str(tmp_path / "o"), "--act-scheme", "static")
    assert r.returncode == 2 and "act_scheme apply to smoothquant / w8a8 / fp8 only" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


def test_dummy_w8a8_weights_for_speed_runs():
    """`--dummy-weights --w-bits 8`: every projection a W8A8 int8 layer with weights of the dense
    dummies' scale, and the model runs (finite logits)."""
    from lowbit.loading.dummy import INIT_STD, build_dummy_model

    model, _, ckpt = build_dummy_model("tiny", 8, device="cpu")
    layers = [m for m in model.modules() if getattr(m, "method", None) is not None and m.method.name != "dense"]
    assert layers and all(m.method.name == "w8a8" and m.weight.dtype == torch.int8 for m in layers)
    w = layers[0].method.dequantize(layers[0])
    assert abs(float(w.std()) - INIT_STD) < 0.2 * INIT_STD
    assert ckpt.quant["quant_method"] == "compressed-tensors"
    with torch.inference_mode():
        logits = model(torch.tensor([[1, 2, 3]]))
    assert torch.isfinite(logits).all()
