"""int4 KV in a Hadamard basis (PagedKVCache.rotation): exact in real arithmetic (an orthonormal
change of basis of q, k and v, undone on the output), and a smaller error where keys have outlier
channels, as real models' keys do after rotary embedding."""
import torch

from lowbit.layers.paged_kv_cache import ROTATION_ENV, PagedAttentionMetadata, PagedKVCache, hadamard


def test_hadamard_is_orthonormal_and_its_own_inverse():
    h = hadamard(64)
    torch.testing.assert_close(h @ h, torch.eye(64), atol=1e-6, rtol=0)
    assert torch.equal(h, h.T)


def _attend(kv_bits, q, k, v):
    t = q.shape[2]
    cache = PagedKVCache(1, 4, 16, k.shape[1], k.shape[3], kv_bits, torch.float32, "cpu")
    cache.set_metadata(PagedAttentionMetadata(
        slot_mapping=torch.arange(t), block_tables=torch.arange(4, dtype=torch.int32)[None],
        context_lens=torch.tensor([t], dtype=torch.int32), num_decode=0, query_lens=[t], context_lens_host=[t]))
    cos, sin = torch.ones(1, t, k.shape[3]), torch.zeros(1, t, k.shape[3])  # no rotary: the identity
    out = cache.attention(0, *(x.transpose(1, 2) for x in (q, k, v)), cos, sin)
    return out.transpose(1, 2), cache.rotation is not None


def test_int4_kv_in_a_hadamard_basis_has_less_error_on_outlier_channels(monkeypatch):
    g = torch.Generator().manual_seed(0)
    t, heads, d = 48, 2, 64
    q, k, v = (torch.randn(1, heads, t, d, generator=g) for _ in range(3))
    k[..., 5] *= 20.0  # one outlier channel per head, as post-rotary keys have
    exact, rotated = _attend(16, q, k, v)
    assert not rotated
    monkeypatch.setenv(ROTATION_ENV, "0")
    plain, rotated = _attend(4, q, k, v)
    assert not rotated
    monkeypatch.setenv(ROTATION_ENV, "auto")  # the default: int4 rotates
    turned, rotated = _attend(4, q, k, v)
    assert rotated
    err_plain, err_turned = (plain - exact).norm() / exact.norm(), (turned - exact).norm() / exact.norm()
    assert err_turned < 0.5 * err_plain, (err_turned, err_plain)
    monkeypatch.setenv(ROTATION_ENV, "1")  # int8 too, on request: still the same attention
    turned8, rotated = _attend(8, q, k, v)
    assert rotated and (turned8 - exact).norm() / exact.norm() < 0.02
