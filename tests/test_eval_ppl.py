"""Perplexity: our runtime against transformers on the same windows, and the `eval ppl` command."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import run_cli
from lowbit.eval.datasets import load_text
from lowbit.eval.ppl import perplexity, token_windows

SEQLEN, LIMIT = 256, 3


def test_windows_are_non_overlapping_and_drop_the_tail():
    ids = list(range(10))
    w = token_windows(ids, 4)
    assert w.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert token_windows(ids, 4, limit=1).tolist() == [[0, 1, 2, 3]]


def test_wikitext2_ppl_matches_transformers(smol, hf_smol):
    model, tok, _ = smol
    ours = perplexity(model, tok, "wikitext2", SEQLEN, LIMIT, show_progress=False)
    # transformers' model on the same windows, with its own loss (mean NLL of the shifted labels)
    ids = tok.encode(load_text("wikitext2", "eval"), add_special_tokens=False)
    windows = token_windows(ids, SEQLEN, LIMIT)
    with torch.no_grad():
        losses = [float(hf_smol(w[None], labels=w[None]).loss) for w in windows]
    ref = math.exp(sum(losses) / len(losses))
    assert ours.windows == LIMIT and ours.tokens_scored == LIMIT * (SEQLEN - 1)
    assert abs(ours.ppl - ref) / ref < 1e-3, (ours.ppl, ref)
    # a real language model on real English text: far better than uniform, and not degenerate
    assert 5 < ours.ppl < 200


def test_eval_ppl_cli_writes_json(tmp_path, smol):
    out = tmp_path / "ppl.json"
    r = run_cli("eval", "ppl", "default", "--dataset", "tinyshakespeare", "--seqlen", "128", "--limit", "2",
                "--json", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["dataset"] == "tinyshakespeare" and res["windows"] == 2 and res["seqlen"] == 128
    assert res["total_windows"] > 2 and "tinyshakespeare" in res["source"]
    model, tok, _ = smol
    direct = perplexity(model, tok, "tinyshakespeare", 128, 2, show_progress=False)
    assert res["ppl"] == pytest.approx(direct.ppl, rel=1e-4)
    assert f"ppl {res['ppl']:.4f}" in r.stdout


def test_eval_ppl_unknown_dataset_is_one_line():
    r = run_cli("eval", "ppl", "default", "--dataset", "no-such-corpus", "--limit", "1")
    assert r.returncode == 2
    assert "no-such-corpus" in r.stderr and "available" in r.stderr and "Traceback" not in r.stderr
