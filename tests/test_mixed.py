"""Mixed precision (quant/measure.py, bit_budget.py, mixed.py): the optimizer against brute force,
budget and model-mismatch refusals, a resumed measurement, and a mixed checkpoint written, read
back and run. On the `tiny` preset with random weights and a byte-level stub tokenizer, so the whole
file takes seconds; the calibration text is the packaged WikiText-2."""
import itertools
import json
import random

import pytest
import torch

from lowbit.config import ModelConfig
from lowbit.errors import LowbitError
from lowbit.formats import gptq_format
from lowbit.layers.formats import dynamic_override, method_for_checkpoint
from lowbit.loading.loader import build_model, open_checkpoint
from lowbit.models.llama import LlamaModel
from lowbit.models.presets import PRESETS
from lowbit.quant.bit_budget import feasible_bpw, optimize
from lowbit.quant.calibration import calibration_set
from lowbit.quant.measure import measure_model
from lowbit.quant.measurement import read_measurement

BITS, GROUPS = (2, 4, 6), (32, 128)  # a few candidates keep it fast; 6 bits exercises the 6-bit packing
CALIB = dict(dataset="wikitext2", samples=2, seqlen=64, seed=0)


class ByteTokenizer:
    """Bytes mod the tiny vocabulary: enough to draw calibration windows and to save a checkpoint."""

    bos_token_id, eos_token_id = 1, 2

    def encode(self, text, add_special_tokens=False):
        return [b % PRESETS["tiny"]["vocab_size"] for b in text.encode()[:200_000]]

    def save(self, out_dir):
        (out_dir / "tokenizer.json").write_text("{}")


def tiny_net(seed=0, **changes):
    cfg = ModelConfig(**{**PRESETS["tiny"], "rms_norm_eps": 1e-5, **changes}, architecture="LlamaForCausalLM")
    torch.manual_seed(seed)
    net = LlamaModel(cfg, fused=False)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_((1 + 0.1 * torch.randn_like(p)) if "norm" in name else 0.05 * torch.randn_like(p))
    return net


def measure(net, out, **kw):
    calib = calibration_set(ByteTokenizer(), CALIB["dataset"], CALIB["samples"], CALIB["seqlen"], CALIB["seed"])
    return measure_model(net, calib, out, "cpu", source="tiny", calibration=CALIB, bits=BITS, group_sizes=GROUPS,
                         log=kw.pop("log", None), **kw)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    path = tmp_path_factory.mktemp("measure") / "measurement.json"
    measure(tiny_net(), path)
    return path


def hand_made(seed, n_linears=5):
    rng = random.Random(seed)
    entries = []
    for i in range(n_linears):
        numel = rng.choice([64, 128, 256])
        opts = [{"desc": f"o{k}", "total_bits": numel * rng.randint(2, 9) + rng.randint(0, 40), "err": rng.random()}
                for k in range(rng.randint(1, 4))]
        entries.append({"key": f"l{i}", "numel": numel, "options": opts})
    return entries


@pytest.mark.parametrize("seed", range(8))
def test_optimizer_is_exact_against_brute_force(seed):
    """With each linear's error weighted by its numel (no sensitivities) or by a sensitivity."""
    entries = hand_made(seed)
    lo, hi = feasible_bpw(entries)
    numel = sum(e["numel"] for e in entries)
    rng = random.Random(100 + seed)
    weights = None if seed % 2 else [rng.random() * 10 for _ in entries]
    w = weights or [e["numel"] for e in entries]
    for bpw in (lo, lo + (min(hi, 8) - lo) / 3, lo + 2 * (min(hi, 8) - lo) / 3, min(hi, 8)):
        choice = optimize(entries, bpw, weights)
        budget = int(bpw * numel)
        best = min(sum(wi * e["options"][p]["err"] for wi, e, p in zip(w, entries, picks))
                   for picks in itertools.product(*(range(len(e["options"])) for e in entries))
                   if sum(e["options"][p]["total_bits"] for e, p in zip(entries, picks)) <= budget)
        assert choice.total_bits <= budget
        assert choice.weighted_err == pytest.approx(best, rel=1e-12)


def test_budget_outside_the_feasible_range_is_refused(measured, tmp_path):
    entries = read_measurement(measured)["measurement"]
    lo, _ = feasible_bpw(entries)
    for bpw in (lo - 0.01, 8.01):
        with pytest.raises(LowbitError, match=r"--bpw .*: outside the feasible range 2\.\d+ to 6\.687 bits per weight"):
            optimize(entries, bpw)
    import lowbit

    with pytest.raises(LowbitError, match=r"--bpw 1\.5: outside the feasible range"):  # before any work
        lowbit.quantize(tiny_net(), "mixed", tmp_path / "q", tokenizer=ByteTokenizer(), bpw=1.5,
                        measurement=measured, log=None)
    assert not (tmp_path / "q").exists()


def test_measurement_of_another_model_is_refused(measured, tmp_path):
    import lowbit

    other = tiny_net(intermediate_size=384)
    with pytest.raises(LowbitError, match=r"model.layers.0.mlp.gate_proj \[256, 128\] was measured where this model "
                                          r"has model.layers.0.mlp.gate_proj \[384, 128\]"):
        lowbit.quantize(other, "mixed", tmp_path / "q", tokenizer=ByteTokenizer(), bpw=4.0, measurement=measured,
                        log=None)
    with pytest.raises(LowbitError, match="measured a model of 2 layers"):
        measure(tiny_net(num_hidden_layers=3), measured)


def test_an_interrupted_measurement_resumes_after_its_last_layer(measured, tmp_path):
    path = tmp_path / "m.json"

    def stop_after_first_layer(line):
        if line.startswith("layer 1/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        measure(tiny_net(), path, log=stop_after_first_layer)
    partial = read_measurement(path)
    assert partial["layers_done"] == 1 and len(partial["measurement"]) == 7
    lines = []
    data = measure(tiny_net(), path, log=lines.append)
    assert lines[0].endswith("resuming after layer 1 of 2")
    full = read_measurement(measured)
    assert data["layers_done"] == 2
    assert [e["options"] for e in data["measurement"]] == [e["options"] for e in full["measurement"]]
    with pytest.raises(LowbitError, match="an earlier measurement with calibration"):
        measure_model(tiny_net(), torch.zeros(1, 8, dtype=torch.long), path, "cpu", source="tiny",
                      calibration={**CALIB, "seed": 1}, bits=BITS, group_sizes=GROUPS, log=None)


def test_sensitivities_are_measured_after_the_layers_and_resumed(measured, tmp_path):
    """Every linear gets a finite, positive sensitivity (KL per unit of relative output error), the
    same when a file without them is resumed; `quantize mixed` refuses a file without them; and
    they are first order: a quarter of the noise gives about the same KL per unit of it."""
    import lowbit
    from lowbit.quant.measurement import write_measurement
    from lowbit.quant.sensitivity import linear_sensitivities

    data = read_measurement(measured)
    per = data["sensitivity"]["per_linear"]
    assert list(per) == [e["key"] for e in data["measurement"]]
    assert all(0 < v < float("inf") for v in per.values())
    assert len({round(v, 6) for v in per.values()}) > len(per) // 2  # not one number for all
    without = {k: v for k, v in data.items() if k != "sensitivity"}
    path = tmp_path / "m.json"
    write_measurement(path, without)
    with pytest.raises(LowbitError, match="measures 2 of 2 layers and no sensitivities; finish it with `lowbit measure`"):
        lowbit.quantize(tiny_net(), "mixed", tmp_path / "q", tokenizer=ByteTokenizer(), bpw=4.0, measurement=path,
                        log=None)
    lines = []
    again = measure(tiny_net(), path, log=lines.append)
    assert lines[0].endswith("resuming after layer 2 of 2, at the sensitivities")
    assert again["sensitivity"]["per_linear"] == pytest.approx(per, rel=1e-6)
    calib = calibration_set(ByteTokenizer(), CALIB["dataset"], CALIB["samples"], CALIB["seqlen"], CALIB["seed"])
    keys = list(per)[:7]
    quarter = linear_sensitivities(tiny_net(), calib, keys, torch.device("cpu"), rel_noise=2.5e-4, log=None)
    ratios = [quarter[k] / per[k] for k in keys]
    assert all(0.7 < r < 1.4 for r in ratios), ratios


def test_mixed_checkpoint_round_trip(measured, tmp_path):
    import lowbit
    from lowbit.loading.info import format_info, model_info

    res = lowbit.quantize(tiny_net(), "mixed", tmp_path / "q", tokenizer=ByteTokenizer(), bpw=4.0,
                          measurement=measured, calib_samples=2, calib_seqlen=64, log=None)
    settings = res.options["settings"]
    assert len(set(settings.values())) > 1 and 3.9 < res.options["bpw"] <= 4.0
    qconfig = json.loads((res.out_dir / "config.json").read_text())["quantization_config"]
    assert qconfig["dynamic"] and json.loads((res.out_dir / "quantize_config.json").read_text()) == qconfig
    assert read_measurement(res.out_dir / "measurement.json")["layers_done"] == 2

    loaded = build_model(open_checkpoint(res.out_dir), torch.float32, "cpu")
    # the checkpoint holds fp16 scales and fp16 everything else: round the in-memory model alike
    ref = res.model
    with torch.no_grad():
        for name, p in ref.named_parameters():
            owner = name.rpartition(".")[0]
            if owner in res.qweights:
                qw = res.qweights[owner]
                qw.scales = qw.scales.half().float()
                p.copy_(qw.dequantize())
            else:
                p.copy_(p.half().float())
    for name, (bits, group_size) in settings.items():
        method = dict(loaded.named_modules()).get(name, None)
        if method is not None:  # unmerged where q/k/v (gate/up) differ
            assert (method.method.bits, method.method.group_size) == (bits, group_size)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(loaded(ids), ref(ids), atol=1e-4, rtol=0)

    info = model_info(res.out_dir, "cpu")
    assert info.linear_bpw == pytest.approx(res.options["bpw"], abs=1e-4)
    assert info.bit_map == {k: f"{b}b g{g}" for k, (b, g) in settings.items()}
    assert "  layer 1  " in format_info(info)


def test_a_byte_budget_becomes_the_bits_per_weight_that_fill_it(measured, tmp_path):
    """--max-bytes with KV tokens set aside: the linears get 8 x (bytes - 16-bit parameters - KV) / their
    weights, which the optimizer then spends; a budget that leaves nothing, or two budgets, are refused
    before any work."""
    import lowbit
    from lowbit.layers.paged_kv_cache import PagedKVCache
    from lowbit.quant.measurement import linear_shapes

    net = tiny_net()
    cfg = net.config
    linear = sum(o * i for _k, o, i in linear_shapes(net))
    dense = (sum(p.numel() for p in net.parameters()) - linear) * 2
    kv = 100 * PagedKVCache.bytes_per_token(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 8,
                                            torch.float16)
    max_bytes = dense + kv + 4 * linear // 8  # exactly 4 bits a weight left for the linears
    res = lowbit.quantize(tiny_net(), "mixed", tmp_path / "q", tokenizer=ByteTokenizer(), max_bytes=f"{max_bytes}B",
                          kv_tokens=100, kv_bits=8, measurement=measured, calib_samples=2, calib_seqlen=64, log=None)
    assert res.options["bpw_target"] == pytest.approx(4.0, abs=1e-9)
    assert 3.9 < res.options["bpw"] <= 4.0
    assert res.options["byte_budget"] == {"max_bytes": max_bytes, "dense_bytes": dense, "kv_bytes": kv,
                                          "kv_tokens": 100, "kv_bits": 8, "linear_bytes": max_bytes - dense - kv}
    for bad, match in (({"max_bytes": dense + kv}, "leaves nothing for the"),
                       ({"max_bytes": dense + kv + linear // 8}, r"--max-bytes \d+ \(dense parameters \d+ B, KV \d+ B\) "
                                                                 r"leaves 1: outside the feasible range"),
                       ({"max_bytes": "1GB", "bpw": 4.0}, "needs one budget"),
                       ({"bpw": 4.0, "kv_tokens": 8}, "nothing to take it from"),
                       ({"max_bytes": "12 parsecs"}, "expected a size such as 12GB")):
        with pytest.raises(LowbitError, match=match):
            lowbit.quantize(tiny_net(), "mixed", tmp_path / "r", tokenizer=ByteTokenizer(), measurement=measured,
                            log=None, **{"kv_tokens": 100, "kv_bits": 8, **bad})
        assert not (tmp_path / "r").exists()


def test_sizes_read_as_written():
    from lowbit.quant.byte_budget import parse_size

    assert parse_size("12GB") == 12 * 10 ** 9 and parse_size("1.5GiB") == 3 * 2 ** 29
    assert parse_size("900 MB") == 9 * 10 ** 8 and parse_size("4096") == 4096 and parse_size("64kib") == 65536
    for bad in ("0", "-3GB", "GB", "12 GBs"):
        with pytest.raises(LowbitError, match="--max-bytes"):
            parse_size(bad)


def test_dynamic_overrides_follow_gptqmodel():
    dynamic = {"-:.*\\.mlp\\.down_proj$": {}, "+:^model\\.layers\\.0\\..*": {"bits": 6, "group_size": 32},
               ".*q_proj": {"bits": 8}}
    assert dynamic_override(dynamic, "model.layers.0.mlp.down_proj", "cfg") is False
    assert dynamic_override(dynamic, "model.layers.0.self_attn.q_proj", "cfg") == {"bits": 6, "group_size": 32}
    assert dynamic_override(dynamic, "model.layers.1.self_attn.q_proj", "cfg") == {"bits": 8}
    assert dynamic_override(dynamic, "model.layers.1.self_attn.k_proj", "cfg") is None
    method_for = method_for_checkpoint({"quant_method": "gptq", "bits": 4, "group_size": 128, "dynamic": dynamic})
    assert method_for("model.layers.0.mlp.down_proj", 256, 128) is None
    assert (method_for("model.layers.0.mlp.up_proj", 128, 256).bits, method_for("model.layers.1.mlp.up_proj", 128, 256).bits) == (6, 4)
    with pytest.raises(LowbitError, match="override 'damp_percent' for model.layers.1.self_attn.q_proj"):
        method_for_checkpoint({"quant_method": "gptq", "bits": 4, "dynamic": {".*": {"damp_percent": 0.1}}})(
            "model.layers.1.self_attn.q_proj", 128, 128)


@pytest.mark.parametrize("bits", [5, 6])
def test_five_and_six_bit_codes_pack_into_the_gptq_bit_stream(bits):
    codes = torch.randint(0, 2 ** bits, (64, 96), generator=torch.Generator().manual_seed(bits))
    packed = gptq_format.pack_last(codes, bits)
    assert packed.shape == (64, 96 * bits // 32)
    assert torch.equal(gptq_format.unpack_last(packed, bits).long(), codes)


def test_cli_refuses_a_missing_measurement_and_a_missing_budget_in_one_line(tmp_path):
    from conftest import run_cli

    for args, needles in (
            (["--bpw", "4", "--measurement", str(tmp_path / "none.json")], ["none.json: no such measurement file",
                                                                           "lowbit measure"]),
            ([], ["quantize mixed needs one budget: --bpw", "--max-bytes"])):
        r = run_cli("quantize", "mixed", "default", "--work-dir", str(tmp_path / "q"), *args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert all(n in lines[0] for n in needles), lines[0]
    assert list(tmp_path.iterdir()) == []
