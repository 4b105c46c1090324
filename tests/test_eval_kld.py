"""`lowbit eval kld`: KL(reference || model) is 0 against itself, positive against an RTN model and
equal to a direct computation, and the saved top-k reference reproduces the live number."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import run_cli
from lowbit.eval.datasets import load_text
from lowbit.eval.kld import kl_divergence, kld_windows
from lowbit.eval.logit_store import load, save
from lowbit.eval.ppl import token_windows

SEQLEN, LIMIT, K = 64, 2, 64


@pytest.fixture(scope="module")
def windows(smol):
    return token_windows(smol[1].encode(load_text("wikitext2", "eval"), add_special_tokens=False), SEQLEN, LIMIT)


@pytest.fixture(scope="module")
def rtn_model():
    import lowbit

    return lowbit.quantize("default", "rtn", w_bits=4, group_size=64, log=None).model


def test_kld_with_itself_is_zero(smol, windows):
    kl, same, nll_m, nll_r, _ = kld_windows(smol[0], windows, reference=smol[0])
    assert kl.shape == (LIMIT * (SEQLEN - 1),)
    assert np.abs(kl).max() < 1e-9 and same.mean() == 1.0 and nll_m == nll_r


def _direct(hf, model, windows):
    """KL(transformers' reference || model) per token and top-1 agreement, written out from softmaxes."""
    kls, same = [], []
    with torch.no_grad():
        for w in windows:
            p = torch.softmax(hf(w[None]).logits[0, :-1].double(), -1)
            q = torch.softmax(model(w[None])[0, :-1].double(), -1)
            kls.append((p * (p.log() - q.log())).sum(-1))
            same.append(p.argmax(-1) == q.argmax(-1))
    return torch.cat(kls).numpy(), torch.cat(same).numpy()


def test_kld_against_rtn_is_positive_and_matches_direct(smol, hf_smol, rtn_model, windows, tmp_path):
    kl, same, _, _, rows = kld_windows(rtn_model, windows, reference=smol[0], save_k=K)
    kl_ref, same_ref = _direct(hf_smol, rtn_model, windows)
    assert kl.mean() > 1e-3 and (kl >= -1e-9).all()
    assert kl == pytest.approx(kl_ref, abs=1e-4, rel=1e-3)
    assert abs(same.mean() - same_ref.mean()) <= 1 / same.size  # a near tie may flip at most one token
    assert 0.3 < same.mean() < 1.0

    # the saved top-k reference: the coarsened KL is the live KL less the tail's share, exactly
    path = save(tmp_path / "ref.safetensors", windows, rows, {"dataset": "wikitext2", "source": "test"})
    saved = load(path)
    assert saved.k == K and torch.equal(saved.windows, windows)
    kl_saved, same_saved, _, _, _ = kld_windows(rtn_model, saved.windows, saved=saved)
    assert (same_saved == same).all()
    tail = []
    with torch.no_grad():
        for w in windows:
            lp = torch.log_softmax(smol[0](w[None])[0, :-1].double(), -1)
            lq = torch.log_softmax(rtn_model(w[None])[0, :-1].double(), -1)
            idx = lp.topk(K, -1).indices
            rest = torch.ones_like(lp, dtype=torch.bool).scatter_(1, idx, False)
            p_rest, q_rest = (lp.exp() * rest).sum(-1), (lq.exp() * rest).sum(-1)
            within = (lp.exp() * (lp - lq) * rest).sum(-1)
            tail.append(within - p_rest * (p_rest.log() - q_rest.log()))
    tail = torch.cat(tail).numpy()
    assert (tail >= -1e-9).all()  # data-processing inequality: coarsening never raises the KL
    # fp16 storage of the top-k log-probs is the only difference left
    assert kl_saved + tail == pytest.approx(kl, abs=2e-3)
    assert abs((kl_saved + tail).mean() - kl.mean()) < 2e-4
    assert 0.5 * kl.mean() < kl_saved.mean() <= kl.mean() + 2e-4


def test_eval_kld_cli_saves_and_reuses_reference(tmp_path, smol):
    ref, out = tmp_path / "ref.safetensors", tmp_path / "a.json"
    r = run_cli("eval", "kld", "default", "--reference", "default", "--dataset", "tinyshakespeare", "--seqlen", "32",
                "--limit", "2", "--save-logits", str(ref), "--top-k", "16", "--json", str(out))
    assert r.returncode == 0, r.stderr
    a = json.loads(out.read_text())
    assert a["kld_mean"] == 0 and a["top1_agreement"] == 1.0 and a["tokens"] == 2 * 31 and a["kld_max"] == 0
    assert a["command"].startswith("lowbit eval kld default") and len(a["data_sha256"]) == 1
    assert "KLD mean" in r.stdout
    # the saved file stands in for the reference: same windows, same top-1, KL ~0 up to fp16 storage
    b = kl_divergence(smol[0], smol[1], saved=load(ref), show_progress=False)
    assert b.top_k == 16 and b.tokens == a["tokens"] and b.dataset == "tinyshakespeare"
    assert b.top1_agreement == 1.0 and abs(b.kld_mean) < 1e-3
    assert b.ppl_reference == pytest.approx(a["ppl_reference"], rel=1e-5)
    assert b.ppl_model == pytest.approx(a["ppl_model"], rel=1e-5)


def test_kv_bits_attend_through_the_paged_cache(smol, windows):
    """16-bit KV through the cache is the plain forward; int8 KV stays close (>= 95% top-1 on these
    tokens) yet is not the same computation; int4 moves further."""
    from lowbit.eval.kv_forward import kv_cache_logits

    x = windows[:1]
    with torch.inference_mode():
        plain = smol[0](x)
        through = {bits: kv_cache_logits(smol[0], x, bits) for bits in (16, 8, 4)}
    assert torch.allclose(through[16], plain, atol=1e-4)
    top1 = {b: float((t.argmax(-1) == plain.argmax(-1)).float().mean()) for b, t in through.items()}
    err = {b: float((t - plain).abs().max()) for b, t in through.items()}
    assert top1[8] >= 0.95 and 0 < err[8] < err[4]
    kl, same, *_ = kld_windows(smol[0], x, reference=smol[0], kv_bits=8)
    scored = float((through[8][0, :-1].argmax(-1) == plain[0, :-1].argmax(-1)).float().mean())  # next-token rows
    assert 0 < kl.mean() < 0.05 and same.mean() == pytest.approx(scored, abs=1e-6)
