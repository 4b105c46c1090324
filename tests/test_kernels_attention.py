"""Paged-cache kernels against their references: write_kv (fp16 copy, int8/int4 quantization bit for
bit), decode attention (GQA, head_dim 64/80, several blocks, split-K, sliding window) and varlen
prefill attention (chunked sequences whose context is longer than their queries)."""
from lowbit.kernels.testing import device_for_tests, rel_err

DEV = device_for_tests()  # before any kernel module is imported: it picks GPU or interpreter

import pytest  # noqa: E402
import torch  # noqa: E402

from lowbit.kernels.kv_quant import packed_head_dim, quantize_kv_ref  # noqa: E402
from lowbit.kernels.kv_write import write_kv, write_kv_ref  # noqa: E402
from lowbit.kernels.paged_attention import paged_decode_attention, paged_decode_attention_ref  # noqa: E402
from lowbit.kernels.prefill_attention import paged_prefill_attention, paged_prefill_attention_ref  # noqa: E402

NAN = float("nan")


def make_paged(ctx_lens, kvh, d, bs, kv_bits, dtype, seed):
    """A paged cache holding each sequence's ctx tokens in shuffled blocks; every slot no sequence
    owns is NaN (fp16 values or quantized scale/zero) and spare block-table entries point at real
    blocks, so a kernel that reads past a context or through a stale entry turns the output NaN."""
    g = torch.Generator().manual_seed(seed)
    n_blocks = sum(-(-c // bs) for c in ctx_lens) + 2
    order = torch.randperm(n_blocks, generator=g)
    width = max(-(-c // bs) for c in ctx_lens) + 1
    tables = torch.randint(0, n_blocks, (len(ctx_lens), width), generator=g).to(torch.int32)
    vals = torch.randn(2, n_blocks, bs, kvh, d, generator=g)
    owned = torch.zeros(n_blocks, bs, dtype=torch.bool)
    used = 0
    for s, c in enumerate(ctx_lens):
        nb = -(-c // bs)
        tables[s, :nb] = order[used: used + nb].to(torch.int32)
        owned.view(-1, bs)[order[used: used + nb].long()] = (
            torch.arange(nb * bs).view(nb, bs) < c)
        used += nb
    if kv_bits == 16:
        k, v = (x.to(dtype).masked_fill(~owned[..., None, None], NAN) for x in vals)
        return (k, v, None, None), tables
    (kc, ksz), (vc, vsz) = (quantize_kv_ref(x, kv_bits) for x in vals)
    ksz, vsz = (sz.masked_fill(~owned[..., None, None], NAN) for sz in (ksz, vsz))
    return (kc, vc, ksz, vsz), tables


def on_dev(*ts):
    return [None if t is None else t.to(DEV) for t in ts]


@pytest.mark.parametrize("kv_bits,d", [(16, 64), (8, 64), (4, 64), (8, 80), (4, 80)])
def test_write_kv_matches_reference(kv_bits, d):
    g = torch.Generator().manual_seed(kv_bits + d)
    t, kvh, bs, n_blocks = 9, 2, 16, 3
    k = (torch.randn(t, kvh, d, generator=g) * 3).half()
    v = torch.randn(t, kvh, d, generator=g).half()
    slots = torch.randperm(n_blocks * bs, generator=g)[:t]
    slots[4] = -1  # a padding token
    if kv_bits == 16:
        caches = [torch.full((n_blocks, bs, kvh, d), NAN, dtype=torch.float16) for _ in range(2)] + [None, None]
    else:
        dc = packed_head_dim(d, kv_bits)
        caches = [torch.full((n_blocks, bs, kvh, dc), 0xA5, dtype=torch.uint8) for _ in range(2)]
        caches += [torch.full((n_blocks, bs, kvh, 2), NAN, dtype=torch.float16) for _ in range(2)]
    ours = on_dev(*caches)
    ref = [None if c is None else c.clone() for c in caches]
    write_kv(k.to(DEV), v.to(DEV), ours[0], ours[1], slots.to(DEV), kv_bits, ours[2], ours[3])
    write_kv_ref(k, v, ref[0], ref[1], slots, kv_bits, ref[2], ref[3])
    for a, b in zip(ours, ref):
        if b is not None:  # bit-exact: the same codes, scales and zeros; untouched slots keep their poison
            assert torch.equal(a.cpu().view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("kv_bits", [16, 8, 4])
def test_write_kv_with_rope_rotates_q_and_the_stored_k(kv_bits):
    """rope=(q, cos, sin): q rotated in place (GQA: 3 query heads a KV head), k rotated as stored,
    v as it was; the same as rotating first (the reference) up to fp16 rounding of k's products."""
    g = torch.Generator().manual_seed(kv_bits)
    t, kvh, d, bs, n_blocks = 5, 2, 64, 16, 2
    q = torch.randn(t, 3 * kvh, d, generator=g).half()
    k, v = (torch.randn(t, kvh, d, generator=g) * 3).half(), torch.randn(t, kvh, d, generator=g).half()
    freqs = torch.tensor([7.0, 0.0, 300.0, 2.0, 41.0])[:, None] * 10000 ** (-torch.arange(0, d, 2) / d)
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos().half(), emb.sin().half()
    slots = torch.tensor([3, 17, -1, 0, 30])
    if kv_bits == 16:
        caches = [torch.zeros(n_blocks, bs, kvh, d, dtype=torch.float16) for _ in range(2)] + [None, None]
    else:
        dc = packed_head_dim(d, kv_bits)
        caches = [torch.zeros(n_blocks, bs, kvh, dc, dtype=torch.uint8) for _ in range(2)]
        caches += [torch.zeros(n_blocks, bs, kvh, 2, dtype=torch.float16) for _ in range(2)]
    ours, ref = on_dev(*caches), [None if c is None else c.clone() for c in caches]
    q_dev, k_dev, q_ref = q.clone().to(DEV), k.to(DEV), q.clone()  # (clones: DEV may be the CPU)
    write_kv(k_dev, v.to(DEV), ours[0], ours[1], slots.to(DEV), kv_bits, ours[2], ours[3],
             rope=(q_dev, cos.to(DEV), sin.to(DEV)))
    write_kv_ref(k, v, ref[0], ref[1], slots, kv_bits, ref[2], ref[3], rope=(q_ref, cos, sin))
    assert rel_err(q_dev, q_ref) < 2e-3 and not torch.equal(q_ref, q)
    assert torch.equal(k_dev.cpu(), k)  # the tensor k is read, not rotated
    if kv_bits == 16:
        for a, b in zip(ours[:2], ref[:2]):
            assert rel_err(a, b) < 2e-3
    else:  # codes may differ by one where k's fp16 rounding differs: compare what is read back
        from lowbit.kernels.kv_quant import dequantize_kv_ref
        for a, b, sa, sb in ((ours[0], ref[0], ours[2], ref[2]), (ours[1], ref[1], ours[3], ref[3])):
            got = dequantize_kv_ref(a.cpu(), sa.cpu(), kv_bits, torch.float32)
            want = dequantize_kv_ref(b, sb, kv_bits, torch.float32)
            assert rel_err(got, want) < 0.02


DECODE = [  # kv_bits, heads, kv_heads, head_dim, block_size, dtype, num_splits, sliding_window
    (16, 4, 2, 64, 16, torch.float16, None, None),
    (8, 4, 2, 64, 16, torch.bfloat16, None, None),
    (4, 4, 4, 80, 16, torch.float16, None, None),
    (16, 2, 1, 80, 32, torch.bfloat16, 3, None),
    (8, 6, 2, 80, 16, torch.float16, 4, None),
    (4, 6, 2, 64, 32, torch.float16, 2, None),
    (8, 4, 2, 64, 16, torch.float16, 2, 20),
]


@pytest.mark.parametrize("kv_bits,h,kvh,d,bs,dtype,splits,window", DECODE)
def test_paged_decode_matches_reference(kv_bits, h, kvh, d, bs, dtype, splits, window):
    ctx = [1, 37, 70]
    (kc, vc, ksz, vsz), tables = make_paged(ctx, kvh, d, bs, kv_bits, dtype, seed=h * d + kv_bits)
    q = torch.randn(len(ctx), h, d, generator=torch.Generator().manual_seed(d)).to(dtype)
    lens = torch.tensor(ctx, dtype=torch.int32)
    kw = dict(kv_bits=kv_bits, sliding_window=window)
    out = paged_decode_attention(*on_dev(q, kc, vc, tables, lens), k_scale_zero=on_dev(ksz)[0],
                                 v_scale_zero=on_dev(vsz)[0], num_splits=splits, **kw)
    ref = paged_decode_attention_ref(q, kc, vc, tables, lens, k_scale_zero=ksz, v_scale_zero=vsz, **kw)
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_err(out, ref) < (1.5e-2 if dtype == torch.bfloat16 else 3e-3)


PREFILL = [  # kv_bits, heads, kv_heads, head_dim, block_size, dtype, sliding_window
    (16, 4, 2, 64, 16, torch.float16, None),
    (8, 2, 2, 80, 16, torch.bfloat16, None),
    (4, 4, 1, 64, 32, torch.float16, None),
    (16, 4, 2, 80, 16, torch.float16, 9),
]


@pytest.mark.parametrize("kv_bits,h,kvh,d,bs,dtype,window", PREFILL)
def test_paged_prefill_matches_reference(kv_bits, h, kvh, d, bs, dtype, window):
    # a fresh prompt, a chunk of a longer prompt (context > queries), and a prefix-cache hit of one query
    q_lens, ctx = [19, 7, 1], [19, 40, 23]
    (kc, vc, ksz, vsz), tables = make_paged(ctx, kvh, d, bs, kv_bits, dtype, seed=h + d + kv_bits)
    q = torch.randn(sum(q_lens), h, d, generator=torch.Generator().manual_seed(1)).to(dtype)
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    lens = torch.tensor(ctx, dtype=torch.int32)
    kw = dict(kv_bits=kv_bits, sliding_window=window)
    out = paged_prefill_attention(*on_dev(q, kc, vc, tables, cu, lens), k_scale_zero=on_dev(ksz)[0],
                                  v_scale_zero=on_dev(vsz)[0], **kw)
    ref = paged_prefill_attention_ref(q, kc, vc, tables, cu, lens, k_scale_zero=ksz, v_scale_zero=vsz, **kw)
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_err(out, ref) < (1.5e-2 if dtype == torch.bfloat16 else 3e-3)


def test_attention_rejects_mismatched_cache():
    (kc, vc, ksz, vsz), tables = make_paged([5], 2, 64, 16, 8, torch.float16, seed=0)
    q = torch.randn(1, 4, 64).half()
    with pytest.raises(ValueError, match="needs v_scale_zero"):
        paged_decode_attention(q, kc, vc, tables, torch.tensor([5], dtype=torch.int32), kv_bits=8,
                               k_scale_zero=ksz)
    with pytest.raises(ValueError, match="expected 32 for head_dim 64 at kv_bits 4"):
        paged_decode_attention(q, kc, vc, tables, torch.tensor([5], dtype=torch.int32), kv_bits=4,
                               k_scale_zero=ksz, v_scale_zero=vsz)
