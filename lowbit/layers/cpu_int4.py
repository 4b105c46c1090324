"""A CPU matmul over 4-bit group-quantized weights with fp32 activations (AVX2 + FMA, OpenMP):
y = x @ W^T + b with W = (code - zero) * scale read from half a byte a weight.

Why: CPU decode is memory-bound. A dense fp32 GEMV streams 4 bytes a weight (~7 GB/s on 2 cores
of an AMD EPYC: SmolLM2-135M's 106M quantized weights take ~45 ms a token), this 0.5 (~10 ms).
PyTorch's own `aten._weight_int4pack_mm_for_cpu` runs fp32 activations through a scalar loop on
AVX2 (torch 2.13: ~8 ms for one 1536x576 GEMV) and rounds scales to bf16 in its fast path.

Numerics: sum over groups of scale * sum_k (code - zero) * x_k, in fp32 with FMA. code - zero is
exact (int8); the reference (`dequantize_codes` + F.linear) rounds (code - zero) * scale to fp32
first and sums in another order: the two differ by fp32 rounding only (relative ~1e-6,
`tests/test_cpu_weights.py`), and the scale multiply moves from every weight to every group.

Layout (`pack`): codes uint8 [N, K] -> [N, K/2], per 32 columns 16 bytes, byte i holding column i
in its low nibble and column 16 + i in its high one, so one 16-byte load unpacks to 32 floats in
order. Scales fp32 and zeros int8, [N, G] each. Needs K and the group size to be multiples of 32.

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

typedef struct {
    const uint8_t* packed;  /* [N, K/2], see pack() */
    const float* scales;    /* [N, G] */
    const int8_t* zeros;    /* [N, G] */
    const float* bias;      /* [N] or NULL */
    int64_t n, k, group_size;
} lowbit_w4;

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* x [M, K] fp32 -> y [M, N] fp32 */
void lowbit_w4_linear(const float* x, float* y, int64_t M, const lowbit_w4* w, int num_threads) {
    const int64_t N = w->n, K = w->k, GS = w->group_size, G = K / GS;
    const __m128i low4 = _mm_set1_epi8(0x0F);
    #pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t* row = w->packed + n * (K / 2);
        for (int64_t m = 0; m < M; m++) {
            const float* xm = x + m * K;
            __m256 total = _mm256_setzero_ps();
            for (int64_t g = 0; g < G; g++) {
                const __m128i z = _mm_set1_epi8(w->zeros[n * G + g]);
                __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
                __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
                for (int64_t k = g * GS; k < (g + 1) * GS; k += 32) {
                    const __m128i b = _mm_loadu_si128((const __m128i*)(row + k / 2));
                    /* code - zero, exact in int8: columns k .. k+15, then k+16 .. k+31 */
                    const __m128i lo = _mm_sub_epi8(_mm_and_si128(b, low4), z);
                    const __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), low4), z);
                    a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), _mm256_loadu_ps(xm + k), a0);
                    a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))),
                                         _mm256_loadu_ps(xm + k + 8), a1);
                    a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), _mm256_loadu_ps(xm + k + 16), a2);
                    a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))),
                                         _mm256_loadu_ps(xm + k + 24), a3);
                }
                /* the group's scale once: sum_k (code - zero) * scale * x = scale * sum_k (code - zero) * x */
                total = _mm256_fmadd_ps(_mm256_set1_ps(w->scales[n * G + g]),
                                        _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)), total);
            }
            const float r = hsum(total);
            y[m * N + n] = w->bias ? r + w->bias[n] : r;
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
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
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


def supports(codes: torch.Tensor, zeros: torch.Tensor, group_size: int) -> bool:
    """Whether the kernel takes codes uint8 [N, K] with zeros [N, G] in groups of `group_size`:
    4-bit codes, zeros that fit int8 beside them, K and the group size multiples of 32."""
    k = codes.shape[1]
    return (k % COLUMN_BLOCK == 0 and group_size % COLUMN_BLOCK == 0 and k % group_size == 0
            and int(codes.max()) < 16 and int(zeros.min()) >= 0 and int(zeros.max()) < 128)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [N, K], values < 16 -> [N, K/2] in the layout of the module docstring."""
    n, k = codes.shape
    c = codes.view(n, k // COLUMN_BLOCK, 2, COLUMN_BLOCK // 2)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


class _Layout(ctypes.Structure):  # lowbit_w4 in SOURCE
    _fields_ = [("packed", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("zeros", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("group_size", ctypes.c_int64)]


class Int4Weight:
    """One layer's weight in the kernel's form, and the call: `w(x)` = x @ W^T + b for fp32 x
    [..., K]. Holds the tensors the kernel reads and a struct of their addresses, so the per-call
    Python stays small (a decode step of a 30-layer model makes 120 of these calls)."""

    __slots__ = ("fn", "packed", "scales", "zeros", "bias", "n", "k", "group_size", "_layout", "_layout_ptr")

    def __init__(self, fn, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 bias: torch.Tensor | None, group_size: int):
        """codes uint8 [N, K] (values < 16), scales [N, G], zeros [N, G] (values 0..127; G = K /
        group_size), bias [N] or None. Copies what it keeps (packed codes, fp32 scales, int8 zeros)."""
        self.fn = fn
        self.n, self.k = codes.shape
        self.group_size = group_size
        self.packed = pack(codes)
        self.scales = scales.float().contiguous()
        self.zeros = zeros.to(torch.int8).contiguous()
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self._layout = _Layout(self.packed.data_ptr(), self.scales.data_ptr(), self.zeros.data_ptr(),
                               None if self.bias is None else self.bias.data_ptr(), self.n, self.k, group_size)
        self._layout_ptr = ctypes.addressof(self._layout)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_contiguous():
            x = x.contiguous()
        y = torch.empty(x.shape[:-1] + (self.n,), dtype=torch.float32)
        self.fn(x.data_ptr(), y.data_ptr(), x.numel() // self.k, self._layout_ptr, torch.get_num_threads())
        return y
