"""`lowbit quantize` on the default model: the written AWQ / GPTQ directories, read back by an
independent reading of each layout (numpy bit operations from the spec, not lowbit's unpack code),
give transformers' LlamaForCausalLM the same logits our runtime computes from the directory; GPTQ
and AWQ beat their baselines on real activations; bad requests are refused before any work."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import lowbit
from conftest import run_cli
from lowbit.errors import LowbitError

SMALL = dict(group_size=64, calib_samples=2, calib_seqlen=128)  # 576 % 128 != 0, so g64
SMALL_CLI = ["--group-size", "64", "--calib-samples", "2", "--calib-seqlen", "128"]


# ---- the independent reader: the layouts as their specs state them ----------------------------
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ gemm.py: nibble i holds column AWQ_ORDER[i] of 8


def awq_unpack_np(words: np.ndarray) -> np.ndarray:
    """int32 [rows, n/8] -> int64 [rows, n]."""
    u = words.view(np.uint32).astype(np.int64)
    out = np.empty((u.shape[0], u.shape[1] * 8), np.int64)
    for i, col in enumerate(AWQ_ORDER):
        out[:, col::8] = (u >> (4 * i)) & 0xF
    return out


def gptq_stream_np(words_by_row: np.ndarray, bits: int) -> np.ndarray:
    """int32 [rows, w]: each row's words as one little-endian bit stream of bits-wide values."""
    raw = np.ascontiguousarray(words_by_row).astype("<i4").view(np.uint8)  # [rows, 4w] bytes
    stream = np.unpackbits(raw, axis=1, bitorder="little").astype(np.int64)  # [rows, 32w] bits
    vals = stream.reshape(stream.shape[0], -1, bits)
    return (vals << np.arange(bits)).sum(-1)  # [rows, 32w / bits]


def dense_from_dir(path) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """fp32 state dict with every packed linear dequantized; and each linear's codes/zeros/scales."""
    cfg = json.loads((path / "config.json").read_text())
    q = cfg["quantization_config"]
    bits, gs = q["bits"], q["group_size"]
    tensors = load_file(str(path / "model.safetensors"))
    state, parts = {}, {}
    for name in sorted(n for n in tensors if n.endswith(".qweight")):
        base = name[: -len(".qweight")]
        qweight, qzeros = tensors[name].numpy(), tensors[f"{base}.qzeros"].numpy()
        scales_gxn = tensors[f"{base}.scales"].float().numpy()
        if q["quant_method"] == "awq":
            codes_kxn, zeros_gxn = awq_unpack_np(qweight), awq_unpack_np(qzeros)
            k = codes_kxn.shape[0]
            g_idx = np.arange(k) // (k if gs == -1 else gs)
        else:
            codes_kxn = gptq_stream_np(qweight.T, bits).T  # packed along the input dim
            zeros_gxn = (gptq_stream_np(qzeros, bits) + 1) % 2 ** bits  # v1 stores zero - 1
            g_idx = tensors[f"{base}.g_idx"].numpy().astype(np.int64)
        w_kxn = (codes_kxn - zeros_gxn[g_idx]) * scales_gxn[g_idx]
        state[f"{base}.weight"] = torch.from_numpy(w_kxn.T.astype(np.float32))
        parts[base] = {"codes": codes_kxn.T, "zeros": zeros_gxn.T, "scales": scales_gxn.T, "g_idx": g_idx}
    for name, t in tensors.items():
        if not name.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales", "g_idx"):
            state[name] = t.float()
    return state, parts


# ---- the runs ---------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread here and in the CLIs we start: on a 2-core machine shared with other jobs,
    OpenMP threads waiting on a descheduled sibling made AWQ 20x slower (108 s for one layer);
    one thread costs ~1.4x on an idle machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """{key: (directory, QuantizedWeights or None)} for AWQ (through the CLI), GPTQ with act-order
    (a permuted g_idx) and RTN in the GPTQ layout (g_idx = column // group). The CLI run goes on
    in its own process (one thread) while this one runs the other two: two cores, both busy."""
    root = tmp_path_factory.mktemp("quantized")
    cli = subprocess.Popen([sys.executable, "-m", "lowbit.cli", "quantize", "awq", "default", "--work-dir",
                            str(root / "awq"), *SMALL_CLI], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        runs = {}
        for key, kw in {"gptq-actorder": dict(act_order=True, static_groups=False),
                        "rtn-gptq": dict(fmt="gptq")}.items():
            method = key.split("-")[0]
            res = lowbit.quantize("default", method, root / key, log=None, **SMALL, **kw)
            runs[key] = (res.out_dir, res.qweights)
        out, err = cli.communicate(timeout=600)
    finally:
        cli.kill()
    assert cli.returncode == 0, err
    assert "layer 30/30" in err and f"wrote {root / 'awq'}" in out
    runs["awq"] = (root / "awq", None)
    return runs


@pytest.fixture(scope="module")
def hf_llama(written):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = json.loads((written["awq"][0] / "config.json").read_text())
    cfg.pop("quantization_config")
    cfg["torch_dtype"] = "float32"
    return LlamaForCausalLM(LlamaConfig(**cfg)).float().eval()


@pytest.fixture(scope="module")
def dense_ppl(smol):
    from lowbit.eval.ppl import perplexity

    return perplexity(smol[0], smol[1], "wikitext2", 256, limit=4, show_progress=False).ppl


@pytest.mark.parametrize("key", ["awq", "gptq-actorder", "rtn-gptq"])
def test_independent_dequantization_gives_transformers_our_logits(key, written, hf_llama, dense_ppl):
    from lowbit.eval.ppl import perplexity
    from lowbit.loading.loader import load_model

    path, qweights = written[key]
    state, parts = dense_from_dir(path)
    assert len(parts) == 210  # q/k/v/o/gate/up/down of 30 layers
    if qweights is not None:  # the file holds exactly the codes the algorithm chose
        for name, p in parts.items():
            qw = qweights[name]
            assert np.array_equal(p["codes"], qw.codes.numpy()), name
            assert np.array_equal(p["zeros"], qw.zeros.numpy()), name
            assert np.array_equal(p["scales"], qw.scales.half().float().numpy()), name
            g_idx = qw.group_index().numpy()
            assert np.array_equal(p["g_idx"], g_idx), name
        permuted = key == "gptq-actorder"
        assert any(not np.array_equal(p["g_idx"], np.arange(len(p["g_idx"])) // 64) for p in parts.values()) == permuted
    missing, unexpected = hf_llama.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    hf_llama.tie_weights()

    ours, tok, _ = load_model(path, "fp32", "cpu")
    ids = torch.tensor([tok.encode_chat([{"role": "user", "content": "Name three primary colors."}])])
    with torch.no_grad():
        ref = hf_llama(ids).logits
        diff = (ours(ids) - ref).abs().max().item()
    assert diff < 1e-3, diff
    # and the 4-bit model is still a language model: perplexity close to the dense model's
    q = perplexity(ours, tok, "wikitext2", 256, limit=4, show_progress=False).ppl
    assert q < 1.5 * dense_ppl, (q, dense_ppl)


def test_generate_and_info_on_quantized_dirs(written):
    r = run_cli("generate", str(written["awq"][0]), "--prompt", "What is 2+2?", "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    r = run_cli("info", str(written["gptq-actorder"][0]), "--json")
    assert r.returncode == 0, r.stderr
    facts = json.loads(r.stdout)
    assert (facts["format"], facts["bits"], facts["group_size"], facts["desc_act"], facts["sym"]) == \
        ("gptq", 4, 64, True, False)
    assert facts["quantized_linears"] == facts["linears"] == 210
    assert facts["quantized_by"]["method"] == "gptq"

    from lowbit.loading.info import format_info, model_info

    awq = model_info(written["awq"][0])
    assert (awq.format, awq.bits, awq.group_size, awq.zero_point, awq.version) == ("awq", 4, 64, True, "gemm")
    # 4-bit codes + fp16 scales/zeros per 64 + the fp16 embedding table (a fifth of SmolLM2's parameters)
    assert 0.7 < awq.bytes_per_param < 0.95
    assert "awq 4-bit, group size 64" in format_info(awq)


# ---- the algorithms beat their baselines on real activations ----------------------------------
@pytest.fixture(scope="module")
def layer_inputs(smol, gguf_path):
    """Real calibration activations entering decoder layer 3 (hidden states after layers 0-2), on the
    model built as quantizers build it: one projection per checkpoint name."""
    from lowbit.loading.loader import build_model, open_checkpoint
    from lowbit.quant.calibration import calibration_set
    from lowbit.quant.driver import LayerInputs, _first_inputs

    _, tok, _ = smol
    model = build_model(open_checkpoint(gguf_path), torch.float32, "cpu", fused=False)
    calib = calibration_set(tok, "wikitext2", 2, 256, seed=1)
    inputs = _first_inputs(model, calib, "cpu", torch.float32, 16384)
    for layer in model.layers[:3]:
        inputs = LayerInputs(inputs.forward(layer), inputs.cos, inputs.sin)
    return model.layers[3], inputs


def _captured(layer, inputs, name):
    """(x [tokens, in], weight [out, in], the GPTQ Hessian of x) for one linear of the layer."""
    from lowbit.quant.gptq import HessianAccumulator

    xs = []
    inputs.capture(layer, [name], lambda _n, x: xs.append(x.reshape(-1, x.shape[-1])))
    x = torch.cat(xs)
    w = layer.get_submodule(name).weight.data
    h = HessianAccumulator(w.shape[1], "cpu")
    h.add(x)
    return x, w, h.h_in_in


def reference_gptq(w, h, bits, gs, act_order=False, damp=0.01, block=128):
    """GPTQ as the paper's Algorithm 1 writes it, in float64, one column at a time: Cholesky factor
    of the dampened H^-1, lazy block updates, each group's min/max range taken when its first column
    is reached (from the updated weights, in the act-order permutation when there is one).
    Returns the dequantized weight in the natural column order."""
    w, h = w.double().clone(), h.double().clone()
    n = w.shape[1]
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(n)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.diag(h).mean() * torch.eye(n, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    maxq = 2 ** bits - 1
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        err = torch.zeros(w.shape[0], b1 - b0, dtype=w.dtype)
        for c in range(b0, b1):
            if c % gs == 0:
                grp = w[:, c:c + gs]
                lo, hi = grp.min(1).values.clamp(max=0), grp.max(1).values.clamp(min=0)
                scale = ((hi - lo) / maxq).clamp(min=1e-8)
                zero = torch.round(-lo / scale)
            q[:, c] = (torch.clamp(torch.round(w[:, c] / scale) + zero, 0, maxq) - zero) * scale
            e = (w[:, c] - q[:, c]) / u[c, c]
            w[:, c:b1] -= e[:, None] * u[c, c:b1][None, :]
            err[:, c - b0] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]
    return q[:, torch.argsort(perm)]


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_matches_the_papers_algorithm(layer_inputs, act_order):
    """Same weights and Hessian into our GPTQ and into a float64 line-by-line reference: the same
    weights come out and the same output error. Our float32 and the reference's float64 break a few
    rounding ties differently, and a row's later columns then follow another path (0.3% of weights
    here); a wrong update or group range changes most of them."""
    from lowbit.quant.gptq import gptq_quantize

    layer, inputs = layer_inputs
    x, w, h = _captured(layer, inputs, "self_attn.o_proj")
    ours = gptq_quantize(w, h, 4, 64, act_order=act_order, static_groups=False).dequantize()
    ref = reference_gptq(w, h, 4, 64, act_order).float()
    differ = ((ours - ref).abs() > 1e-4 * w.abs().max()).float().mean().item()
    assert differ < 0.01, differ

    def err(wq):
        return (x @ (w - wq).T).pow(2).sum().item()

    assert abs(err(ours) - err(ref)) < 0.01 * err(ref), (err(ours), err(ref))


def test_gptq_group_ranges_follow_the_updated_weights_without_act_order(layer_inputs):
    """Static groups only make sense with act-order; without it each group's range must come from the
    error-updated weights (from the original ones, updated weights fall outside and get clamped)."""
    from lowbit.quant.gptq import gptq_quantize

    layer, inputs = layer_inputs
    _, w, h = _captured(layer, inputs, "mlp.down_proj")
    a = gptq_quantize(w, h, 4, 64, act_order=False, static_groups=True)
    b = gptq_quantize(w, h, 4, 64, act_order=False, static_groups=False)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_layer_error_below_rtn(layer_inputs, act_order):
    from lowbit.quant.gptq import gptq_quantize
    from lowbit.quant.rtn import quantize_rtn

    layer, inputs = layer_inputs
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
        x, w, h = _captured(layer, inputs, name)

        def err(qw):
            return (x @ w.T - x @ qw.dequantize().T).norm().item()

        for bits in (4, 3):
            e_gptq = err(gptq_quantize(w, h, bits, 64, act_order=act_order, static_groups=False))
            e_rtn = err(quantize_rtn(w, bits, 64))
            assert e_gptq < 0.7 * e_rtn, (name, bits, e_gptq, e_rtn)


def test_mse_group_ranges_lower_the_rounding_error(layer_inputs):
    """The searched range is never worse than min/max for any group (p = 1 is on the grid), and on
    real weights it is better on the whole, for the weights and for the layer output."""
    from lowbit.quant.rtn import MSE_NORM, quantize_rtn

    layer, inputs = layer_inputs
    x, w, _ = _captured(layer, inputs, "mlp.down_proj")
    for bits in (4, 3):
        plain, mse = quantize_rtn(w, bits, 64), quantize_rtn(w, bits, 64, mse=True)
        e_plain = (plain.dequantize() - w).abs().pow(MSE_NORM).view(w.shape[0], -1, 64).sum(-1)
        e_mse = (mse.dequantize() - w).abs().pow(MSE_NORM).view(w.shape[0], -1, 64).sum(-1)
        assert (e_mse <= e_plain * (1 + 1e-5)).all()
        assert e_mse.sum() < 0.95 * e_plain.sum(), (bits, e_mse.sum(), e_plain.sum())
        out_err = [(x @ (w - q.dequantize()).T).pow(2).sum().item() for q in (plain, mse)]
        assert out_err[1] < out_err[0], (bits, out_err)


def test_awq_scales_lower_block_error_than_no_scaling(layer_inputs):
    import copy

    from lowbit.quant.awq import search_scales

    layer, inputs = layer_inputs
    mlp = copy.deepcopy(layer.mlp)
    xs = []
    inputs.capture(layer, ["mlp.gate_proj"], lambda _n, x: xs.append(x.clone()))
    w_before = mlp.gate_proj.weight.clone()
    scales, losses = search_scales(mlp, xs, [mlp.gate_proj, mlp.up_proj], 4, 64, False)
    # losses[0] is alpha = 0: s = mean|x|^0 = 1, plain RTN of the unscaled block
    assert min(losses) < 0.95 * losses[0], losses
    assert not torch.allclose(scales, torch.ones_like(scales))
    assert torch.equal(mlp.gate_proj.weight, w_before)  # the search leaves the weights as they were


# ---- refusals: one line, exit 2, nothing written -----------------------------------------------
def _one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_group_size_that_does_not_divide_is_refused_before_work(tmp_path):
    out = tmp_path / "out"
    r = run_cli("quantize", "gptq", "default", "--work-dir", str(out), "--group-size", "100")
    _one_line_error(r, "model.layers.0.self_attn.q_proj", "--group-size 100", "in_features 576",
                    "valid group sizes for this model: 32, 64, -1")
    assert list(tmp_path.iterdir()) == []


def test_bad_bits_and_busy_work_dir_are_refused(tmp_path):
    _one_line_error(run_cli("quantize", "rtn", "default", "--work-dir", str(tmp_path / "a"), "--w-bits", "5"),
                    "--w-bits 5", "2, 3, 4, 8")
    _one_line_error(run_cli("quantize", "awq", "default", "--work-dir", str(tmp_path / "b"), "--w-bits", "3"),
                    "--format awq stores 4-bit codes", "--format gptq")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    _one_line_error(run_cli("quantize", "rtn", "default", "--work-dir", str(busy)), "already exists", "--overwrite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]


def test_already_quantized_and_short_calibration_are_refused(written, smol, gguf_path, tmp_path):
    from lowbit.loading.loader import build_model, open_checkpoint

    with pytest.raises(LowbitError, match="already quantized"):
        lowbit.quantize(written["awq"][0], "rtn", tmp_path / "again", log=None)
    merged, tok, _ = smol  # loaded for inference: q/k/v and gate/up merged
    with pytest.raises(LowbitError, match=r"model.layers.0.self_attn.qkv_proj: .*fused=False"):
        lowbit.quantize(merged, "gptq", tmp_path / "merged", tokenizer=tok, group_size=64, log=None)
    model = build_model(open_checkpoint(gguf_path), torch.float32, "cpu", fused=False)
    with pytest.raises(LowbitError, match=r"--calib-samples 500 x --calib-seqlen 2048 .* were requested"):
        lowbit.quantize(model, "gptq", tmp_path / "short", tokenizer=tok, group_size=64, calib_samples=500,
                        calib_seqlen=2048, log=None)
    assert list(tmp_path.iterdir()) == []
