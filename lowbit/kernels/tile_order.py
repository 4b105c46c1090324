"""The order in which a tiled matmul's programs take their output tiles (Triton's matmul tutorial
calls it grouped ordering): GROUP_M row tiles walk the column tiles together, so the tiles of both
operands that neighbouring programs read are still in L2. Shared by the W4A16 and W8A8 GEMMs."""
from __future__ import annotations

import triton
import triton.language as tl

from lowbit.kernels._common import interpreting

_TRITON_INTERPRET = interpreting()  # what @triton.jit saw when this module was imported


@triton.jit
def grouped_tile(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Program `pid` -> (pid_m, pid_n), its row and column tile."""
    grid_m = tl.cdiv(M, BM)
    grid_n = tl.cdiv(N, BN)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    rows_here = tl.minimum(grid_m - first_m, GROUP_M)
    return first_m + (pid % width) % rows_here, (pid % width) // rows_here
