"""Which implementation runs for each role: the matmul of every weight format, RMSNorm, rotary,
SwiGLU's silu_and_mul, the KV-cache write, decode and prefill attention (STYLE rule 12: what ran
is visible). The bench JSON records it for the engine it measured; `lowbit info` says what would
run for a checkpoint on this machine."""
from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.layers import cpu_weights
from lowbit.layers.linear import LinearMethod
from lowbit.layers.paged_kv_cache import AttentionKernels, kernel_import_failure, load_attention_kernels

# The PyTorch paths: the CPU's, and what a role runs where the cache was given no kernel.
TORCH_DENSE = "torch F.linear"
TORCH_PACKED = cpu_weights.PATHS["cache"]  # the CPU's default path for AWQ / GPTQ layers
TORCH_ATTENTION = {"kv_write": "torch index_copy_", "attention_decode": "torch sdpa (padded batch)",
                   "attention_prefill": "torch sdpa (per sequence)"}
W4A16 = "triton w4a16_matmul"
W4A16_CUDA = ("w4a16_matmul: CUDA C++ gemv at batch 1 (kernels/csrc/w4a16_gemv.cu) and tensor-core kernel "
              "among the tuner's candidates up to 64 rows (kernels/csrc/w4a16_mma.cu), Triton beside and above")
# compressed-tensors W8A8 layers (layers/w8a8_linear.py): int8 runs the Triton GEMM on CUDA, fp8
# its PyTorch reference everywhere until an fp8 GEMM lands
TORCH_W8A8 = {"w8a8": "torch int8 reference (exact int32 accumulation)",
              "fp8": "torch fp8 e4m3 reference (fp32 accumulation)"}
W8A8_CUDA = {"w8a8": "triton int8 GEMM (kernels/w8a8.py: per-token quantization, scales in the epilogue)",
             "fp8": TORCH_W8A8["fp8"]}
# norm.py, rotary.py and activation.py choose by device alone: Triton on CUDA, these elsewhere
TORCH_BY_DEVICE = {"rmsnorm": "torch RMSNorm (fp32)", "rotary": "torch rotate_half",
                   "silu_and_mul": "torch F.silu * up"}


def _name(fn) -> str:
    """'triton paged_decode_attention' for our kernels; a stand-in (a test's) by its full name."""
    module = getattr(fn, "__module__", "") or ""
    if module.startswith("lowbit.kernels."):
        return f"triton {fn.__name__}"
    return f"{module}.{getattr(fn, '__qualname__', repr(fn))}"


def attention_kernels(kernels: AttentionKernels, kv_bits: int = 16) -> dict[str, str]:
    torch_write = TORCH_ATTENTION["kv_write"] if kv_bits == 16 else "torch quantize_kv_ref + index_copy_"
    return {"kv_write": _name(kernels.write_kv) if kernels.write_kv else torch_write,
            "attention_decode": _name(kernels.decode) if kernels.decode else TORCH_ATTENTION["attention_decode"],
            "attention_prefill": _name(kernels.prefill) if kernels.prefill else TORCH_ATTENTION["attention_prefill"]}


def by_device(device: torch.device) -> dict[str, str]:
    """The roles whose layer picks its kernel by the tensor's device (x.is_cuda)."""
    if device.type != "cuda":
        return dict(TORCH_BY_DEVICE)
    from lowbit.kernels.activation import silu_and_mul
    from lowbit.kernels.rmsnorm import rmsnorm
    from lowbit.kernels.rotary import rotary_cos_sin

    return {"rmsnorm": _name(rmsnorm), "rotary": _name(rotary_cos_sin), "silu_and_mul": _name(silu_and_mul)}


def _linear(module) -> str:
    method = module.method
    if method.name == "dense":
        return TORCH_DENSE
    if method.name in TORCH_W8A8:  # W8A8 layers choose by the device their weight is on
        return (W8A8_CUDA if module.weight.is_cuda else TORCH_W8A8)[method.name]
    # a packed format holds the W4A16 kernel's weight once after_load found the kernel (CUDA only)
    weight = getattr(method, "_kernel_weight", None)
    return _w4a16_label(weight.qweight_int32_kxn.device) if weight else TORCH_PACKED


def _w4a16_label(device: torch.device) -> str:
    from lowbit.kernels import cuda_ext

    return W4A16_CUDA if cuda_ext.enabled(device) else W4A16


def kernels_in_use(model, cache=None) -> dict:
    """{"linear": {format: implementation}, "rmsnorm": ..., "rotary": ..., "silu_and_mul": ...,
    "kv_write": ..., "attention_decode": ..., "attention_prefill": ...} for a built model and, where
    given, its PagedKVCache."""
    linear: dict[str, set[str]] = {}
    for module in model.modules():
        method = getattr(module, "method", None)
        if isinstance(method, LinearMethod):
            linear.setdefault(method.name, set()).add(_linear(module))
    report: dict = {"linear": {fmt: " | ".join(sorted(impls)) for fmt, impls in sorted(linear.items())},
                    **by_device(next(model.parameters()).device)}
    if cache is not None:
        report.update(attention_kernels(cache.kernels, cache.kv_bits))
        if cache.kernels.write_kv is not None and cache.rotation is None:  # PagedKVCache.attention's fusion
            report["rotary"] = f"in kv_write ({report['kv_write']} with rope: q in place, k as stored)"
    return report


def planned_kernels(fmt: str, bits: int | None, device: torch.device) -> dict:
    """What a checkpoint of weight format `fmt` ("dense", "awq", "gptq") would run on `device`,
    without loading it (`lowbit info`). On CUDA the kernels are imported, and one that fails
    says so with its cause."""
    packed = fmt in ("awq", "gptq")
    w8a8 = {fmt: TORCH_W8A8[fmt]} if fmt in TORCH_W8A8 else {}  # compressed-tensors int8 / fp8 layers
    if device.type != "cuda":
        linear = {fmt: TORCH_PACKED} if packed else w8a8
        return {"linear": {**linear, "dense": TORCH_DENSE}, **TORCH_BY_DEVICE, **attention_kernels(AttentionKernels())}
    try:
        elementwise = by_device(device)
    except Exception as e:  # what the layer would raise at its first forward
        elementwise = dict.fromkeys(TORCH_BY_DEVICE, f"error: {kernel_import_failure(e)}")
    try:
        attention = attention_kernels(load_attention_kernels())
    except LowbitError as e:
        attention = dict.fromkeys(TORCH_ATTENTION, f"error: {e}")
    linear = {fmt: W8A8_CUDA[fmt]} if fmt in W8A8_CUDA else {}
    if packed:
        try:
            from lowbit.kernels import w4a16
        except Exception as e:  # what the layer would raise when it loads
            linear[fmt] = f"error: lowbit.kernels.w4a16 failed to import ({type(e).__name__}: {e})"
        else:
            linear[fmt] = _w4a16_label(device) if bits in w4a16.SUPPORTED_BITS else TORCH_PACKED
    return {"linear": {**linear, "dense": TORCH_DENSE}, **elementwise, **attention}


def format_kernels(report: dict) -> str:
    """One line: 'linear awq: triton w4a16_matmul, dense: torch F.linear; kv_write: ...'."""
    linear = ", ".join(f"{fmt}: {impl}" for fmt, impl in report["linear"].items())
    rest = "; ".join(f"{role}: {impl}" for role, impl in report.items() if role != "linear")
    return f"linear {linear}" + (f"; {rest}" if rest else "")
