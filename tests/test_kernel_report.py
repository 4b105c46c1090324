"""What runs is visible and a kernel that fails to import is loud (STYLE rule 12): the report of
implementations per role, `lowbit info`'s kernels line, and the import errors, which name the
kernel module and its cause. On the CPU nothing imports Triton (it is an optional extra)."""
import json
import sys
import types

import pytest
from conftest import run_cli

from lowbit.errors import LowbitError
from lowbit.layers.kernel_report import (TORCH_ATTENTION, TORCH_BY_DEVICE, TORCH_DENSE, TORCH_PACKED, kernels_in_use,
                                         planned_kernels)
from lowbit.layers.paged_kv_cache import AttentionKernels, load_attention_kernels
from lowbit.loading.dummy import build_dummy_model


def _stub_kernel_module(monkeypatch, name: str, **functions):
    mod = types.ModuleType(f"lowbit.kernels.{name}")
    for fn_name, fn in functions.items():
        fn.__module__, fn.__name__ = mod.__name__, fn_name
        setattr(mod, fn_name, fn)
    monkeypatch.setitem(sys.modules, mod.__name__, mod)


def test_a_kernel_that_fails_to_import_is_an_error_naming_it(monkeypatch):
    _stub_kernel_module(monkeypatch, "kv_write", write_kv=lambda *a, **k: None)
    monkeypatch.setitem(sys.modules, "lowbit.kernels.paged_attention", None)  # what a failed import leaves
    with pytest.raises(LowbitError, match=r"lowbit\.kernels\.paged_attention failed to import") as e:
        load_attention_kernels()
    assert "lowbit[kernels]" in str(e.value) and "--device cpu" in str(e.value)


def test_a_kernel_module_that_breaks_at_import_is_named_with_the_cause(monkeypatch):
    monkeypatch.delitem(sys.modules, "lowbit.kernels.kv_write", raising=False)
    monkeypatch.setitem(sys.modules, "triton", None)  # a CPU install: no Triton
    with pytest.raises(LowbitError, match=r"lowbit\.kernels\.kv_write failed to import \(ModuleNotFoundError: .*triton"):
        load_attention_kernels()


def test_the_w4a16_kernel_failing_to_import_is_an_error_not_the_slow_path(monkeypatch):
    model, _, _ = build_dummy_model("tiny", w_bits=4, dtype="fp32", device="cpu")
    layer = model.model.layers[0].self_attn.o_proj
    layer.method._kernel_weight = None  # not tried yet, as on a GPU at load
    monkeypatch.setitem(sys.modules, "lowbit.kernels.w4a16", None)
    import lowbit.kernels

    # `from lowbit.kernels import w4a16` reads the package attribute first where an earlier test imported it
    monkeypatch.delattr(lowbit.kernels, "w4a16", raising=False)
    with pytest.raises(LowbitError, match=r"o_proj: lowbit\.kernels\.w4a16 failed to import"):
        layer.method._gpu_kernel(layer)
    assert layer.method._kernel_weight is None  # asked again, it fails again: never a silent fallback


def test_the_report_names_what_runs():
    model, _, _ = build_dummy_model("tiny", w_bits=4, dtype="fp32", device="cpu")
    assert kernels_in_use(model) == {"linear": {"awq": TORCH_PACKED, "dense": TORCH_DENSE}, **TORCH_BY_DEVICE}

    def stand_in(*a, **k):
        pass

    stand_in.__module__ = "lowbit.kernels.paged_attention"
    stand_in.__name__ = "paged_decode_attention"
    cache = types.SimpleNamespace(kernels=AttentionKernels(decode=stand_in), kv_bits=8)
    report = kernels_in_use(model, cache)
    assert report["attention_decode"] == "triton paged_decode_attention"
    assert report["attention_prefill"] == TORCH_ATTENTION["attention_prefill"]
    assert report["kv_write"] == "torch quantize_kv_ref + index_copy_"
    assert planned_kernels("gptq", 3, __import__("torch").device("cpu"))["linear"] == {"gptq": TORCH_PACKED,
                                                                                       "dense": TORCH_DENSE}


def test_the_cpu_path_never_imports_triton():
    """A plain CPU install has no Triton: an AWQ model generates through the engine without it."""
    code = ("import sys, json\n"
            "sys.modules['triton'] = None  # as if not installed\n"
            "from lowbit import LLM, SamplingParams\n"
            "from lowbit.loading.dummy import build_dummy_model\n"
            "from lowbit.layers.kernel_report import kernels_in_use\n"
            "llm = LLM(build_dummy_model('tiny', w_bits=4, dtype='fp32', device='cpu'), max_model_len=32)\n"
            "out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2, ignore_eos=True))[0]\n"
            "r = llm.engine.runner\n"
            "print(json.dumps([len(out.token_ids), kernels_in_use(r.model, r.cache),"
            " sorted(m for m in sys.modules if m.startswith('lowbit.kernels.'))]))\n")
    import subprocess

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    n_tokens, report, kernel_modules = json.loads(r.stdout)
    assert n_tokens == 2
    assert report == {"linear": {"awq": TORCH_PACKED, "dense": TORCH_DENSE}, **TORCH_BY_DEVICE, **TORCH_ATTENTION}
    assert kernel_modules == ["lowbit.kernels.kv_quant"]  # the KV format's PyTorch reference only


def test_info_says_which_kernels_would_run():
    r = run_cli("info", "default")
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("kernels ("))
    assert f"linear dense: {TORCH_DENSE}" in line  # a GGUF is dequantized to dense weights on load
    if "(cpu)" in line:
        assert all(impl in line for impl in [*TORCH_BY_DEVICE.values(), *TORCH_ATTENTION.values()]), line
