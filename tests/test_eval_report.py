"""`lowbit eval report`: bits per weight read from the stored tensors, perplexity and KLD of each
checkpoint against the first on the same windows, task scores, the table / JSON / figure written
together, and each checkpoint directory's own eval_results.json."""
import json
from pathlib import Path

import pytest

from lowbit.eval.ppl import perplexity
from lowbit.eval.report import ReportOptions, run_report

TEST_DATA = Path(__file__).parent / "data"


def test_report_of_the_default_model_and_an_rtn_checkpoint(tmp_path, smol, monkeypatch):
    import lowbit

    monkeypatch.setenv("LOWBIT_DATA_DIR", str(TEST_DATA))
    ck = tmp_path / "rtn-w4g64"
    lowbit.quantize("default", "rtn", ck, w_bits=4, group_size=64, log=None)
    out = tmp_path / "report"
    opts = ReportOptions(seqlen=64, limit=2, tasks=["boolq"], task_limit=1, batch_size=2)
    rep = run_report(["default", str(ck)], out, opts, log=lambda *_: None)
    ref, q = rep["rows"]
    # the embedded GGUF is Q4_1 (blocks of 32: 16 bytes of codes + fp16 scale and min) = 5 bits a weight
    assert ref["bits_per_weight"] == pytest.approx(5.0)
    # 4-bit codes, plus per group of 64 an fp16 scale and a 4-bit zero (AWQ) or g_idx (GPTQ): 4.3 to 4.4
    assert 4.3 < q["bits_per_weight"] < 4.4
    assert ref["ppl"] == pytest.approx(perplexity(smol[0], smol[1], "wikitext2", 64, limit=2, show_progress=False).ppl,
                                       rel=1e-6)
    assert q["ppl"] > 0 and q["kld_mean"] > 0 and 0.0 < q["top1"] <= 1.0 and "kld_mean" not in ref
    assert q["tasks"]["boolq"]["n"] == 1
    assert {p.name for p in out.iterdir()} == {"report.json", "report.md", "report.png"}
    table = (out / "report.md").read_text()
    assert "rtn-w4g64" in table and "boolq (acc)" in table
    saved = json.loads((ck / "eval_results.json").read_text())
    assert saved["results"] == q and saved["reference"] == "default" and saved["data_sha256"]
    from lowbit.loading.info import format_info, model_info

    shown = format_info(model_info(ck, "cpu"))
    assert f"ppl {q['ppl']:.4f}" in shown and "boolq acc" in shown and "vs default" in shown
