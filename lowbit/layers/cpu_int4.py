"""A CPU matmul over 4-bit group-quantized weights with fp32 activations (AVX2 + FMA, OpenMP):
y = x @ W^T + b with W = (code - zero) * scale read from half a byte a weight.

Why: CPU decode is memory-bound. A dense fp32 GEMV streams 4 bytes a weight (~7 GB/s on 2 cores
of an AMD EPYC: SmolLM2-135M's 106M quantized weights take ~45 ms a token), this 0.5 (~10 ms).
PyTorch's own `aten._weight_int4pack_mm_for_cpu` runs fp32 activations through a scalar loop on
AVX2 (torch 2.13: ~8 ms for one 1536x576 GEMV) and rounds scales to bf16 in its fast path.

Numerics: each weight is formed exactly as `dequantize_codes` forms it, ((float)code - zero) *
scale in fp32, then multiplied into fp32 sums with FMA; only the summation order differs from
F.linear's (a few ulp; `tests/test_cpu_weights.py` compares the two).

Layout (`pack`): codes uint8 [N, K] -> [N, K/2], per 32 columns 16 bytes, byte i holding column i
in its low nibble and column 16 + i in its high one, so one 16-byte load unpacks to 32 floats in
order. Scales and zeros as fp32 [N, G]. Needs K and the group size to be multiples of 32.

The C source below is compiled once per machine with the system C compiler (`cc`, or $CC) into
~/.cache/lowbit (or $LOWBIT_CACHE_DIR) and loaded with ctypes, which releases the GIL during the
call. OpenMP threads are torch's own: torch has loaded libgomp.so.1 already, and the library
links to that soname. `load()` returns None, with the reason in `load_failure()`, where there is
no compiler or the CPU lacks AVX2/FMA; the caller then takes its PyTorch path.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

COLUMN_BLOCK = 32  # columns per 16-byte load; K and the group size must be multiples of it

SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* x [M, K] fp32, packed [N, K/2], scales/zeros [N, K/group_size] fp32, bias [N] or NULL -> y [M, N] */
void lowbit_w4_linear(const float* x, const uint8_t* packed, const float* scales, const float* zeros,
                      const float* bias, float* y, int64_t M, int64_t N, int64_t K, int64_t group_size,
                      int num_threads) {
    const int64_t G = K / group_size;
    const __m128i low4 = _mm_set1_epi8(0x0F);
    #pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t* row = packed + n * (K / 2);
        for (int64_t m = 0; m < M; m++) {
            const float* xm = x + m * K;
            __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
            __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
            for (int64_t g = 0; g < G; g++) {
                const __m256 s = _mm256_set1_ps(scales[n * G + g]);
                const __m256 z = _mm256_set1_ps(zeros[n * G + g]);
                for (int64_t k = g * group_size; k < (g + 1) * group_size; k += 32) {
                    const __m128i b = _mm_loadu_si128((const __m128i*)(row + k / 2));
                    const __m128i lo = _mm_and_si128(b, low4);                      /* columns k .. k+15 */
                    const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);   /* columns k+16 .. k+31 */
                    __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
                    __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
                    __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
                    __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
                    /* the weight exactly as dequantize_codes makes it: (code - zero) * scale */
                    w0 = _mm256_mul_ps(_mm256_sub_ps(w0, z), s);
                    w1 = _mm256_mul_ps(_mm256_sub_ps(w1, z), s);
                    w2 = _mm256_mul_ps(_mm256_sub_ps(w2, z), s);
                    w3 = _mm256_mul_ps(_mm256_sub_ps(w3, z), s);
                    acc0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm + k), acc0);
                    acc1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + k + 8), acc1);
                    acc2 = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xm + k + 16), acc2);
                    acc3 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xm + k + 24), acc3);
                }
            }
            const float r = hsum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
            y[m * N + n] = bias ? r + bias[n] : r;
        }
    }
}
"""
FLAGS = ["-O3", "-mavx2", "-mfma", "-fPIC", "-shared"]

_state: dict = {}  # "fn": the loaded function or None, "why": why not; filled by the first load()


def _cpu_has_avx2_fma() -> bool:
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return False
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return True  # torch found AVX2; its AVX2 level implies FMA on every x86 CPU that has both
    return {"avx2", "fma"} <= set(flags.split())


def _compiler() -> list[str] | None:
    for cmd in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"):
        if cmd and shutil.which(shlex.split(cmd)[0]):
            return shlex.split(cmd)
    return None


def _cache_dir() -> Path:
    root = os.environ.get("LOWBIT_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lowbit"
    return Path(root)


def _build() -> Path:
    """The shared library, compiled on first use (with OpenMP where the compiler has it)."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc, clang or $CC) to build it")
    digest = hashlib.sha256((SOURCE + " ".join(cc + FLAGS)).encode()).hexdigest()[:16]
    target = _cache_dir() / f"cpu_int4_{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, out = Path(tmp) / "cpu_int4.c", Path(tmp) / "cpu_int4.so"
        src.write_text(SOURCE)
        errors = []
        for openmp in (["-fopenmp"], []):  # without OpenMP the pragma is ignored: one thread
            r = subprocess.run([*cc, *FLAGS, *openmp, str(src), "-o", str(out)], capture_output=True, text=True)
            if r.returncode == 0:
                os.replace(out, target)  # atomic: a concurrent build writes the same bytes
                return target
            errors.append(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}")
        raise RuntimeError(f"{' '.join(cc)} failed: {'; '.join(errors)}")


def load():
    """The kernel function, or None (see `load_failure`). Built and loaded once per process."""
    if "fn" not in _state:
        _state["fn"], _state["why"] = None, None
        try:
            if not _cpu_has_avx2_fma():
                raise RuntimeError(f"the CPU has no AVX2+FMA (torch sees {torch.backends.cpu.get_cpu_capability()})")
            fn = ctypes.CDLL(str(_build())).lowbit_w4_linear
            p, i64 = ctypes.c_void_p, ctypes.c_int64
            fn.argtypes = [p, p, p, p, p, p, i64, i64, i64, i64, ctypes.c_int]
            fn.restype = None
            _state["fn"] = fn
        except Exception as e:  # no compiler, a failed build, a CPU without AVX2: the PyTorch path runs
            _state["why"] = f"{type(e).__name__}: {e}"
            log.warning("CPU int4 matmul unavailable (%s); AWQ/GPTQ layers dequantize their weights instead",
                        _state["why"])
    return _state["fn"]


def load_failure() -> str | None:
    """Why `load()` gave None; None when it loaded (or was not tried)."""
    return _state.get("why")


def supports(codes: torch.Tensor, group_size: int) -> bool:
    """Whether `pack` takes these codes [N, K] with groups of `group_size` columns."""
    k = codes.shape[1]
    return k % COLUMN_BLOCK == 0 and group_size % COLUMN_BLOCK == 0 and k % group_size == 0


def pack(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [N, K], values < 16 -> [N, K/2] in the layout of the module docstring."""
    n, k = codes.shape
    c = codes.view(n, k // COLUMN_BLOCK, 2, COLUMN_BLOCK // 2)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def int4_linear(fn, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                bias: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """x fp32 [..., K] -> fp32 [..., N]; packed [N, K/2] from `pack`, scales/zeros fp32 [N, G],
    all contiguous, bias fp32 [N] or None."""
    n, k = packed.shape[0], packed.shape[1] * 2
    x2 = x.reshape(-1, k).contiguous()
    y = torch.empty(x2.shape[0], n, dtype=torch.float32)
    fn(x2.data_ptr(), packed.data_ptr(), scales.data_ptr(), zeros.data_ptr(),
       None if bias is None else bias.data_ptr(), y.data_ptr(), x2.shape[0], n, k, group_size,
       torch.get_num_threads())
    return y.view(*x.shape[:-1], n)
