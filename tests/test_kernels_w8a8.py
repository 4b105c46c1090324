"""The W8A8 int8 kernels (lowbit/kernels/w8a8.py) against their PyTorch references and the integer
product: per-token and static activation quantization (round half to even, as torch.round), the
int8 GEMM with its scale and bias epilogue, ragged tiles; under Triton's interpreter on a CPU."""
from lowbit.kernels.testing import device_for_tests

DEV = device_for_tests()  # before any kernel module is imported: it picks GPU or interpreter

import pytest  # noqa: E402
import torch  # noqa: E402

from lowbit.kernels.w8a8 import (Tile, int8_gemm, int8_gemm_ref, quantize_rows, quantize_rows_ref,  # noqa: E402
                                 w8a8_int8_matmul)
from lowbit.layers.w8a8_linear import w8a8_int8_ref  # noqa: E402


def test_quantize_rows_matches_reference_ties_included():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 300, generator=g) * 3
    x[1, :] = 0.0  # an all-zero token
    x[2, :4] = torch.tensor([127.0, 0.5, 1.5, -2.5])  # scale 1: exact ties round to even
    x[2, 4:] = 0.25
    q, s = quantize_rows(x.to(DEV))
    q_ref, s_ref = quantize_rows_ref(x)
    assert torch.equal(s.cpu(), s_ref)
    assert torch.equal(q.cpu(), q_ref)
    assert q[2, :4].tolist() == [127, 0, 2, -2]
    static = torch.tensor([0.05])
    qs, _ = quantize_rows(x.to(DEV), static.to(DEV))
    assert torch.equal(qs.cpu(), quantize_rows_ref(x, static)[0])
    assert int(qs.min()) == -128  # static scales clip to the full int8 range


@pytest.mark.parametrize("m,n,k", [(1, 40, 96), (17, 48, 200), (33, 24, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_gemm_is_the_integer_product(m, n, k, bias):
    g = torch.Generator().manual_seed(m + n + k)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    sa, sb = torch.rand(m, generator=g) + 0.01, torch.rand(n, generator=g) * 0.01
    bv = torch.randn(n, generator=g) if bias else None
    out = int8_gemm(a.to(DEV), b.to(DEV), sa.to(DEV), sb.to(DEV), None if bv is None else bv.to(DEV), torch.float32,
                    tile=Tile(16, 32, 32, 4, 1))
    ref = int8_gemm_ref(a, b, sa, sb, bv, torch.float32)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-6, atol=1e-6)


def test_w8a8_matmul_equals_the_layers_reference():
    """The kernel path and the layer's CPU reference compute the same integers and scales."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 128, generator=g)
    w = torch.randint(-127, 128, (40, 128), generator=g, dtype=torch.int8)
    ws = torch.rand(40, generator=g) * 0.01
    out = w8a8_int8_matmul(x.to(DEV), w.to(DEV), ws.to(DEV), None)
    torch.testing.assert_close(out.cpu(), w8a8_int8_ref(x, w.float(), ws), rtol=1e-5, atol=1e-6)
    static = torch.tensor([0.02])
    out = w8a8_int8_matmul(x.to(DEV), w.to(DEV), ws.to(DEV), None, static.to(DEV))
    torch.testing.assert_close(out.cpu(), w8a8_int8_ref(x, w.float(), ws, static), rtol=1e-5, atol=1e-6)
