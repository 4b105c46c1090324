"""Fused small ops against their references: rmsnorm (with and without the residual add),
rotary embedding in place (full and partial rotary dims), silu_and_mul."""
from lowbit.kernels.testing import device_for_tests, rel_err

DEV = device_for_tests()  # before any kernel module is imported: it picks GPU or interpreter

import pytest  # noqa: E402
import torch  # noqa: E402

from lowbit.kernels.activation import silu_and_mul, silu_and_mul_ref  # noqa: E402
from lowbit.kernels.rmsnorm import rmsnorm, rmsnorm_ref  # noqa: E402
from lowbit.kernels.rotary import cos_sin_cache, rotary, rotary_ref  # noqa: E402


def rand(*shape, dtype=torch.float16, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


@pytest.mark.parametrize("d,dtype,with_residual", [(96, torch.float16, False), (96, torch.bfloat16, True),
                                                   (200, torch.float16, True)])
def test_rmsnorm_matches_reference(d, dtype, with_residual):
    x, w = rand(2, 5, d, dtype=dtype, seed=1, scale=3), rand(d, dtype=dtype, seed=2)
    r = rand(2, 5, d, dtype=dtype, seed=3) if with_residual else None
    out = rmsnorm(x.to(DEV), w.to(DEV), 1e-5, None if r is None else r.to(DEV))
    ref = rmsnorm_ref(x, w, 1e-5, r)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    if with_residual:
        # the residual sum is rounded once, as torch adds (the interpreter truncates to bf16 instead)
        assert rel_err(out[1], ref[1]) <= (tol if dtype == torch.bfloat16 else 0)
        out, ref = out[0], ref[0]
    assert out.shape == x.shape and rel_err(out, ref) < tol


@pytest.mark.parametrize("d,rot,dtype", [(64, 64, torch.float16), (80, 80, torch.bfloat16), (64, 32, torch.float16)])
def test_rotary_in_place_matches_reference(d, rot, dtype):
    t, h, kvh = 7, 4, 2
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    cache = cos_sin_cache(inv_freq, 64)
    q, k = rand(t, h, d, dtype=dtype, seed=4), rand(t, kvh, d, dtype=dtype, seed=5)
    pos = torch.tensor([0, 5, 63, 2, 2, 17, 40])
    ref_q, ref_k = rotary_ref(q, k, pos, cache)
    q_dev, k_dev = q.to(DEV), k.to(DEV)
    rotary(q_dev, k_dev, pos.to(DEV), cache.to(DEV))
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert rel_err(q_dev, ref_q) < tol and rel_err(k_dev, ref_k) < tol
    if rot < d:  # dims past rot_dim are untouched
        assert torch.equal(q_dev[..., rot:].cpu(), q[..., rot:])


def test_rotary_matches_hf_rotate_half():
    """The model's HF-style apply_rotary (cos/sin duplicated halves; its CPU path), the cache kernel's
    reference, and the per-token cos/sin kernel the model runs on a GPU, in place on strided views
    of one fused q/k/v buffer, all agree; v beside them is untouched."""
    from lowbit.kernels.rotary import rotary_cos_sin
    from lowbit.layers.rotary import apply_rotary

    d, t = 64, 5
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    pos = torch.tensor([3, 1, 4, 1, 5])
    q, k, v = torch.randn(t, 2, d), torch.randn(t, 1, d), torch.randn(t, 1, d)
    freqs = pos.float()[:, None] * inv_freq
    emb = torch.cat([freqs, freqs], -1)
    hf_q, hf_k = (x[0] for x in apply_rotary(q[None], k[None], emb.cos()[None], emb.sin()[None]))
    ref_q, ref_k = rotary_ref(q, k, pos, cos_sin_cache(inv_freq, 8))
    assert rel_err(ref_q, hf_q) < 1e-6 and rel_err(ref_k, hf_k) < 1e-6
    qkv = torch.cat([q, k, v], 1).to(DEV)  # [t, 4 heads, d]: q heads, k head, v head
    rotary_cos_sin(qkv[:, :2], qkv[:, 2:3], emb.cos().to(DEV), emb.sin().to(DEV))
    out = qkv.cpu()
    assert rel_err(out[:, :2], hf_q) < 1e-5 and rel_err(out[:, 2:3], hf_k) < 1e-5
    assert torch.equal(out[:, 3:], v)


@pytest.mark.parametrize("inter,dtype", [(40, torch.float16), (1100, torch.bfloat16)])
def test_silu_and_mul_matches_reference(inter, dtype):
    x = rand(3, 2, 2 * inter, dtype=dtype, seed=6, scale=2)
    out = silu_and_mul(x.to(DEV))
    assert out.shape == (3, 2, inter)
    assert rel_err(out, silu_and_mul_ref(x)) < (1e-2 if dtype == torch.bfloat16 else 2e-3)
