"""W4A16 kernels against w4a16_ref: every path (gemv, tensor-core mm with and without split-K,
dequantize + matmul), 3/4/8-bit, group 32/64/-1, sym/asym, act-order g_idx, fp16/bf16."""
from lowbit.kernels.testing import device_for_tests, rel_err

DEV = device_for_tests()  # before any kernel module is imported: it picks GPU or interpreter

import pytest  # noqa: E402
import torch  # noqa: E402

from lowbit.kernels.w4a16 import Config, pack_w4a16, w4a16_matmul, w4a16_ref  # noqa: E402


def make_weight(n, k, bits, group_size, sym, act_order, seed=0, irregular=False):
    g = torch.Generator().manual_seed(seed)
    n_groups = 1 if group_size == -1 else k // group_size
    codes = torch.randint(0, 2 ** bits, (n, k), generator=g).to(torch.uint8)
    scales = torch.rand(n, n_groups, generator=g) * 0.02 + 0.005
    if sym:
        zeros = torch.full((n, n_groups), 2 ** (bits - 1), dtype=torch.int32)
    else:
        zeros = torch.randint(0, 2 ** bits, (n, n_groups), generator=g).to(torch.int32)
    g_idx = None
    if irregular:  # groups of unequal sizes, in no order
        g_idx = torch.randint(0, n_groups, (k,), generator=g).to(torch.int32)
    elif act_order:  # GPTQ desc_act: column c's group is its rank in a permutation // group_size
        gs = k if group_size == -1 else group_size
        perm = torch.randperm(k, generator=g)
        g_idx = (torch.argsort(perm) // gs).to(torch.int32)
    return codes, scales, zeros, g_idx


CASES = [  # (M, N, K, bits, group, sym, act_order, dtype)
    (1, 48, 256, 4, 32, False, False, torch.float16),
    (1, 40, 384, 4, -1, True, False, torch.bfloat16),
    (1, 32, 256, 8, 64, False, True, torch.float16),
    (1, 32, 256, 3, 32, True, False, torch.float16),
    (3, 48, 256, 4, 64, True, True, torch.bfloat16),
    (3, 32, 256, 8, -1, False, False, torch.float16),
    (16, 32, 256, 3, 64, False, False, torch.bfloat16),
    (16, 64, 128, 4, 32, False, True, torch.float16),
    (33, 48, 256, 4, 32, True, False, torch.float16),
    (33, 32, 256, 8, 64, True, False, torch.bfloat16),
    (16, 48, 384, 4, 128, False, False, torch.float16),  # the fp16 LOP3 tensor-core kernel ('mmh')
    (33, 40, 320, 4, 64, True, False, torch.float16),  # 'mmh' with a padded last block, g64 lanes
    (1, 32, 256, 6, 64, False, False, torch.float16),  # 5 and 6 bits: 8-bit containers
    (16, 32, 256, 5, 32, True, False, torch.float16),
]


@pytest.mark.parametrize("m,n,k,bits,group,sym,act_order,dtype", CASES)
def test_w4a16_matches_reference(m, n, k, bits, group, sym, act_order, dtype):
    codes, scales, zeros, g_idx = make_weight(n, k, bits, group, sym, act_order, seed=m + n + k + bits)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    w = pack_w4a16(codes.to(DEV), scales.to(DEV), zeros.to(DEV), group, g_idx=None if g_idx is None else g_idx.to(DEV),
                   bits=bits)
    out = w4a16_matmul(x.to(DEV), w)
    ref = w4a16_ref(x.float(), codes, scales, zeros, group, g_idx)
    assert out.shape == (m, n) and out.dtype == dtype
    assert rel_err(out, ref) < (2e-2 if dtype == torch.bfloat16 else 4e-3)


@pytest.mark.parametrize("cfg", [Config("gemv", 1, 16, 2, 3, 4, 1), Config("gemv", 1, 32, 1, 1, 4, 1),
                                 Config("mm", 16, 16, 2, 2, 4, 1), Config("mm", 32, 32, 1, 1, 4, 1),
                                 Config("mm", 16, 32, 1, 2, 4, 1, wide=True),
                                 Config("dq", BN=32), Config("gemvf", 1, 16, 1, 2, 4, 1),
                                 Config("gemvh", 1, 16, 1, 2, 4, 1), Config("gemvh", 1, 32, 1, 1, 4, 1),
                                 Config("mmh", 16, 32, 1, 2, 4, 1), Config("mmh", 16, 16, 1, 1, 4, 1),
                                 Config("mmt", 16, 32, 1, 2, 4, 1), Config("mmt", 16, 16, 1, 1, 4, 1)])
def test_w4a16_every_path(cfg):
    """Pinned configs: split-K with a ragged last split (U=2 over 5 blocks), no split, the wide dot,
    and the dense path; twice, so a split-K tile counter left armed by the first call would spoil the second."""
    m = 1 if cfg.kind.startswith("gemv") else 5
    n, k, group = 40, 640, 64
    codes, scales, zeros, g_idx = make_weight(n, k, 4, group, False, False, seed=7)
    x = torch.randn(2, m, k, generator=torch.Generator().manual_seed(3)).half()[:1]  # leading dims kept
    w = pack_w4a16(codes.to(DEV), scales.to(DEV), zeros.to(DEV), group, bits=4)
    ref = w4a16_ref(x.float(), codes, scales, zeros, group)
    for _ in range(2):
        out = w4a16_matmul(x.to(DEV), w, config=cfg)
        assert out.shape == (1, m, n)
        assert rel_err(out, ref) < 4e-3
        assert int(w.locks.abs().sum()) == 0


@pytest.mark.parametrize("cfg", [Config("mmh", 16, 64, 1, 2, 4, 1), Config("mmt", 16, 64, 1, 1, 4, 1)])
@pytest.mark.parametrize("group", [64, 128])
def test_w4a16_fp16_tensor_core_whole_tiles(cfg, group):
    """The LOP3 tensor-core kernels where N and K fill whole tiles (their unmasked loads), both
    group layouts (g64: a block's halves are two groups), a batch smaller than the tile."""
    m, n, k = 5, 128, 512
    codes, scales, zeros, _ = make_weight(n, k, 4, group, False, False, seed=group)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(5)).half()
    w = pack_w4a16(codes.to(DEV), scales.to(DEV), zeros.to(DEV), group, bits=4)
    out = w4a16_matmul(x.to(DEV), w, config=cfg)
    assert rel_err(out, w4a16_ref(x.float(), codes, scales, zeros, group)) < 4e-3
    assert int(w.locks.abs().sum()) == 0


def test_w4a16_irregular_groups_and_padding():
    """Act-order groups of unequal sizes are padded to whole planes; x is gathered to match."""
    n, k, group = 32, 200, 40  # 200 is no multiple of a block: the tail is padding too
    codes, scales, zeros, g_idx = make_weight(n, k, 4, group, False, False, seed=11, irregular=True)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(5)).half()
    w = pack_w4a16(codes.to(DEV), scales.to(DEV), zeros.to(DEV), group, g_idx=g_idx.to(DEV), bits=4)
    assert w.x_index is not None and w.k_padded % 128 == 0
    out = w4a16_matmul(x.to(DEV), w)
    assert rel_err(out, w4a16_ref(x.float(), codes, scales, zeros, group, g_idx)) < 4e-3


def test_w4a16_layout_round_trip():
    """The packed words hold each code where the module docstring says (unpacked here in PyTorch)."""
    n, k = 8, 256
    codes, scales, zeros, _ = make_weight(n, k, 4, 64, False, False, seed=2)
    w = pack_w4a16(codes, scales, zeros, 64, bits=4)
    words = w.qweight_int32_kxn.long() & 0xFFFFFFFF  # [K/8, N]
    e, p = 8, 16
    rec = torch.empty(k, n, dtype=torch.long)
    for r in range(words.shape[0]):
        b, i = divmod(r, p)
        for j in range(e):
            rec[b * e * p + j * p + i] = (words[r] >> (4 * j)) & 0xF
    assert torch.equal(rec.t(), codes.long())
    assert w.scales_gxn.dtype == torch.float16 and w.plane_group.tolist() == [c // 64 for c in range(0, k, 16)]


def test_w4a16_errors():
    codes, scales, zeros, _ = make_weight(8, 64, 4, 32, False, False)
    with pytest.raises(ValueError, match="7-bit"):
        pack_w4a16(codes, scales, zeros, 32, bits=7)
    with pytest.raises(ValueError, match="does not divide"):
        pack_w4a16(codes, scales, zeros, 48, bits=4)
    w = pack_w4a16(codes.to(DEV), scales.to(DEV), zeros.to(DEV), 32)
    with pytest.raises(ValueError, match="expects 64"):
        w4a16_matmul(torch.randn(2, 65, device=DEV).half(), w)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="tuning times configs on a GPU")
def test_w4a16_tuner_picks_and_caches():
    from lowbit.kernels import _common

    codes, scales, zeros, _ = make_weight(256, 512, 4, 128, False, False)
    w = pack_w4a16(codes.cuda(), scales.cuda(), zeros.cuda(), 128)
    x = torch.randn(1, 512, device="cuda").half()
    key = ("test", 1)
    cands = [Config("gemv", 1, 64, 1, 1, 4, 3), Config("mm", 16, 64, 1, 2, 4, 3)]
    import os

    old = os.environ.get("LOWBIT_AUTOTUNE")
    os.environ["LOWBIT_AUTOTUNE"] = "1"
    try:
        best = _common.pick_config(key, lambda: cands, lambda c: w4a16_matmul(x, w, config=c), x.device)
    finally:
        os.environ["LOWBIT_AUTOTUNE"] = old if old is not None else "0"
    assert best in cands and _common.pick_config(key, lambda: cands[::-1], None, x.device) == best


def _cuda_kernels_on() -> bool:
    from lowbit.kernels import cuda_ext

    return torch.cuda.is_available() and cuda_ext.enabled(torch.device("cuda"))


@pytest.mark.skipif(not _cuda_kernels_on(), reason="the CUDA C++ gemv builds and runs on a Hopper-class GPU")
@pytest.mark.parametrize("warps,bn,depth,stages", [(4, 128, 2, 1), (4, 64, 2, 1), (8, 128, 2, 1), (8, 32, 4, 1),
                                                   (16, 64, 2, 1), (16, 32, 2, 1), (16, 32, 4, 1),
                                                   (8, 64, 1, 2), (4, 128, 1, 2), (8, -4, 1, 2)])
@pytest.mark.parametrize("n,k,group,split", [(256, 512, 128, 1), (148, 320, 64, 3), (512, 1024, -1, 7),
                                             (4096, 4096, 128, 4), (1024, 11008, 128, 2), (64, 200, -1, 1)])
def test_w4a16_cuda_gemv(n, k, group, split, warps, bn, depth, stages):
    """The CUDA C++ gemv ('gemvc', csrc/w4a16_gemv.cu; stages 1: the register-ring kernel, >= 2 the
    cp.async one, with fewer or more blocks a warp than stages; bn -c: the cp.async kernel with its
    warps along N, c columns a lane) against the PyTorch reference: both group
    layouts, per-channel scales, a padded last block, N not a multiple of the column tile,
    split-K (twice: a counter left armed would spoil the second call), activations of +-3000 (the
    x / 16 that keeps its fp16 partial sums finite)."""
    codes, scales, zeros, _ = make_weight(n, k, 4, group, False, False, seed=n + k)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(k)).half()
    x[0, ::97] = 3000.0
    w = pack_w4a16(codes.cuda(), scales.cuda(), zeros.cuda(), group, bits=4)
    ref = w4a16_ref(x.float(), codes, scales, zeros, group)
    for _ in range(2):
        wide = bn < 0
        cfg = Config("gemvc", 1, -bn * 32 * warps if wide else bn, depth, split, warps, stages, wide=wide)
        out = w4a16_matmul(x.cuda(), w, config=cfg)
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) < 4e-3
        assert int(w.locks.abs().sum()) == 0


@pytest.mark.skipif(not _cuda_kernels_on(), reason="the CUDA C++ gemv builds and runs on a Hopper-class GPU")
def test_w4a16_cuda_gemv_one_wave_candidates():
    """Under programmatic dependent launch the batch-1 tuner keeps only grids the GPU holds at once
    (csrc's occupancy query): on the 7B shapes some are kept, each within one wave, and the rest
    dropped, among them qkv's 384 programs of 16 warps (two programs an SM: two waves)."""
    from lowbit.kernels._common import sm_count
    from lowbit.kernels.w4a16 import _gemvc_candidates, _gemvc_grid, _gemvc_resident

    sms = sm_count(torch.device("cuda"))
    for n, nb in ((12288, 32), (22016, 32), (4096, 32), (4096, 86)):
        every = _gemvc_candidates(n, nb, sms, one_wave=False)
        kept = _gemvc_candidates(n, nb, sms, one_wave=True)
        assert kept and set(kept) <= set(every)
        assert all(_gemvc_grid(c, n, nb) <= sms * _gemvc_resident(c, nb) for c in kept)
        assert all(_gemvc_grid(c, n, nb) > sms * _gemvc_resident(c, nb) for c in set(every) - set(kept))
    qkv_16_warps = Config("gemvc", 1, 32, 2, 1, 16, 1)
    assert 1 <= _gemvc_resident(qkv_16_warps, 32) <= 4
    if sms * _gemvc_resident(qkv_16_warps, 32) < 384:
        assert qkv_16_warps not in _gemvc_candidates(12288, 32, sms, one_wave=True)


@pytest.mark.skipif(not _cuda_kernels_on(), reason="the CUDA C++ tensor-core kernel builds and runs on a Hopper-class GPU")
@pytest.mark.parametrize("warps,depth", [(4, 2), (8, 2), (4, 3), (4, 4)])
@pytest.mark.parametrize("m,n,k,group,split", [(2, 256, 512, 128, 1), (5, 148, 320, 64, 3), (16, 4096, 4096, 128, 4),
                                               (17, 512, 1024, -1, 7), (33, 1024, 11008, 128, 2),
                                               (64, 4096, 4096, 128, 8), (48, 64, 200, -1, 1), (1, 96, 256, 128, 2)])
def test_w4a16_cuda_mma(m, n, k, group, split, warps, depth):
    """The CUDA C++ tensor-core kernel ('mmc', csrc/w4a16_mma.cu) against the PyTorch reference:
    1-4 row tiles with rows past M, both group layouts, per-channel scales, a padded last block,
    N not a multiple of the column tile (and of 8), K longer than one shared-memory chunk of x,
    split-K (twice: a counter left armed would spoil the second call), a row of x with a stride."""
    if depth > 2 and m > 32:
        pytest.skip("3 or 4 blocks in flight are built up to 32 rows")
    codes, scales, zeros, _ = make_weight(n, k, 4, group, False, False, seed=n + k + m)
    x_wide = torch.randn(m, k + 8, generator=torch.Generator().manual_seed(k + m)).half()
    x = x_wide.cuda()[:, :k]  # rows k + 8 apart
    w = pack_w4a16(codes.cuda(), scales.cuda(), zeros.cuda(), group, bits=4)
    ref = w4a16_ref(x_wide[:, :k].float(), codes, scales, zeros, group)
    for _ in range(2):
        out = w4a16_matmul(x, w, config=Config("mmc", 64, 32 * warps, depth, split, warps, 1))
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) < 4e-3
        assert int(w.locks.abs().sum()) == 0
