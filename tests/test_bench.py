"""`lowbit bench` on the CPU with the tiny dummy preset: each command writes its JSON and PNG, with
figures that add up; the memory table agrees with transformers' own KV cache; shape presets."""
import json

import pytest
import torch
from conftest import run_cli

from lowbit.config import ModelConfig
from lowbit.layers.kernel_report import TORCH_ATTENTION, TORCH_BY_DEVICE, TORCH_DENSE, TORCH_PACKED
from lowbit.layers.paged_kv_cache import PagedKVCache
from lowbit.models.presets import PRESETS, preset_config

TINY = ["--dummy-weights", "--arch", "tiny"]


def _record(tmp_path, name):
    assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rec = json.loads((tmp_path / f"{name}.json").read_text())
    env = rec["env"]
    assert env["device"] == "cpu" and env["torch"] and env["triton"] and "bench" in env["command"]
    return rec


def test_bench_generate_writes_latency_percentiles_and_throughput(tmp_path):
    r = run_cli("bench", "generate", *TINY, "--w-bits", "4", "--concurrency", "1,3", "--input-len", "2",
                "--output-len", "12", "--kv-bits", "16,8", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    rec = _record(tmp_path, "generate")
    assert rec["model"] == "tiny dummy W4A16 g128" and [run["kv_bits"] for run in rec["runs"]] == [16, 8]
    for run in rec["runs"]:
        assert "error" not in run and run["engine"]["cuda_graphs"] == "off: CPU"
        kv_write = "torch index_copy_" if run["kv_bits"] == 16 else "torch quantize_kv_ref + index_copy_"
        assert run["engine"]["kernels"] == {  # what ran on the CPU: the PyTorch paths
            "linear": {"awq": TORCH_PACKED, "dense": TORCH_DENSE}, **TORCH_BY_DEVICE,
            **TORCH_ATTENTION, "kv_write": kv_write}
        assert [res["concurrency"] for res in run["results"]] == [1, 3]
        for res in run["results"]:
            c = res["concurrency"]
            assert res["errors"] == [] and res["output_tokens"] == 12 * c
            assert res["output_tokens_per_s"] == pytest.approx(12 * c / res["wall_s"])
            lat = res["per_token_latency_ms"]
            assert lat["n"] == 11 * c and 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
            assert res["ttft_ms"]["n"] == c and res["ttft_ms"]["p50"] > 0
    assert "c=3" in r.stderr


def test_bench_throughput_falls_back_to_synthetic_lengths(tmp_path):
    r = run_cli("bench", "throughput", *TINY, "--num-prompts", "12", "--input-len", "16", "--output-len", "8",
                "--max-batch-size", "4", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    rec = _record(tmp_path, "throughput")
    res = rec["result"]
    assert rec["synthetic"] and "seed 0" in rec["dataset"]
    assert rec["engine"]["kernels"]["linear"] == {"dense": TORCH_DENSE}
    assert res["completed"] == 12 and res["failed"] == 0
    assert 4 * 12 <= res["output_tokens"] <= 12 * 12  # lengths drawn from 8 +- 50%
    assert res["total_tokens_per_s"] > res["output_tokens_per_s"] > 0
    assert res["requests_per_s"] == pytest.approx(12 / res["wall_s"])


def test_bench_memory_table_and_transformers_kv_agree(tmp_path):
    r = run_cli("bench", "memory", *TINY, "--w-bits", "16,4", "--kv-bits", "16,8", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    rec = _record(tmp_path, "memory")
    fp16, w4 = rec["weights"]
    assert w4["weights_bytes_stored"] < 0.6 * fp16["weights_bytes_stored"]
    rows = {(row["w_bits"], row["kv_bits"]): row for row in rec["rows"]}
    assert set(rows) == {(16, 16), (16, 8), (4, 16), (4, 8)}
    cfg = preset_config("tiny")
    for (w, kv), row in rows.items():
        per = PagedKVCache.bytes_per_token(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, kv,
                                           torch.float16)
        assert row["kv_bytes_per_token"] == per and row["kv_bytes_per_4096_tokens"] == 4096 * per
        # the same cache bytes hold bytes-per-token times more tokens (head_dim 32: 1.78x for int8)
        assert row["kv_tokens_vs_16bit"] == pytest.approx(rows[(w, 16)]["kv_bytes_per_token"] / per, rel=1e-3)
    assert rec["hf"]["kv_bytes_per_token"] == rows[(16, 16)]["kv_bytes_per_token"]
    assert rec["hf"]["weights_bytes"] == fp16["weights_bytes_stored"]


def test_bench_refuses_an_unknown_shape_in_one_line(tmp_path):
    r = run_cli("bench", "generate", "--dummy-weights", "--arch", "llama9-1t", "--out", str(tmp_path))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "llama9-1t" in r.stderr and "llama2-7b" in r.stderr


@pytest.mark.parametrize("arch, billions", [("llama2-7b", 6.74), ("llama3-8b", 8.03), ("llama2-70b", 68.98)])
def test_presets_have_the_released_parameter_counts(arch, billions):
    cfg = preset_config(arch)
    assert isinstance(cfg, ModelConfig) and cfg.num_parameters / 1e9 == pytest.approx(billions, abs=0.01)
    assert cfg.num_attention_heads * cfg.head_dim == cfg.hidden_size
    assert set(PRESETS) >= {"tiny", "llama2-7b", "llama3-8b", "llama2-70b"}
