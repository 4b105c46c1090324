"""CUDA C++ kernels, compiled on first use on a GPU machine (torch.utils.cpp_extension + nvcc).

Only pieces where a measured Triton attempt fell short live here (benchmarks/README.md says which
and by how much); each has a Triton or PyTorch path beside it, so the CPU path never needs a
compiler. On a GPU a kernel that fails to build is an error, not a silent slowdown:
`LOWBIT_CUDA_KERNELS=0` is the explicit way to run without them. The build is cached by torch in
TORCH_EXTENSIONS_DIR (~/.cache/torch_extensions), so only a machine's first process pays it.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

_CSRC = Path(__file__).with_name("csrc")


def enabled(device: torch.device) -> bool:
    """Whether the CUDA C++ kernels are used on `device` (Hopper-class GPUs; opt-out by env)."""
    if device.type != "cuda" or os.environ.get("LOWBIT_CUDA_KERNELS", "1") == "0":
        return False
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


_SOURCES = ("w4a16_gemv.cu", "w4a16_mma.cu")
_DECLS = (
    "void w4a16_gemv(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros, "
    "torch::Tensor out, torch::Tensor partials, torch::Tensor locks, int64_t kx, int64_t group_planes, "
    "int64_t split, int64_t warps, int64_t cols, int64_t depth, int64_t stages, bool wide, bool pdl);",
    "void w4a16_mma(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros, "
    "torch::Tensor out, torch::Tensor partials, torch::Tensor locks, int64_t kx, int64_t group_planes, "
    "int64_t split, int64_t warps, int64_t depth, bool pdl);",
    "int64_t w4a16_gemv_resident(int64_t warps, int64_t cols, int64_t depth, int64_t stages, bool wide, int64_t blocks_per_split);",
)


@functools.lru_cache(maxsize=None)
def w4a16_module():
    """The compiled module holding `w4a16_gemv` (csrc/w4a16_gemv.cu, M = 1) and `w4a16_mma`
    (csrc/w4a16_mma.cu, M = 2..64): one build, one translation unit."""
    from torch.utils.cpp_extension import load_inline

    source = "\n".join((_CSRC / name).read_text() for name in _SOURCES)
    try:
        return load_inline(name="lowbit_w4a16_cuda", cpp_sources=["\n".join(_DECLS)], cuda_sources=[source],
                           functions=["w4a16_gemv", "w4a16_mma", "w4a16_gemv_resident"],
                           extra_include_paths=[str(_CSRC)],  # their shared header (w4a16_groups.cuh)
                           extra_cuda_cflags=["-O3", "-gencode=arch=compute_90,code=sm_90"],
                           verbose=os.environ.get("LOWBIT_CUDA_VERBOSE") == "1")
    except Exception as exc:
        raise RuntimeError("lowbit: building the CUDA W4A16 kernels (lowbit/kernels/csrc/"
                           f"{', '.join(_SOURCES)}) failed: {exc}. Set LOWBIT_CUDA_KERNELS=0 to run the Triton "
                           "kernels instead.") from exc
