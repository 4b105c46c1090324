"""AWQ (GEMM) and GPTQ weights as `LinearMethod`s.

`create_weights` makes the checkpoint's own tensors (`qweight`, `qzeros`, `scales`, `g_idx`) so the
loader fills them by name; `after_load` unpacks them once into the compute form: codes uint8
[out, in], scales [out, G], zeros int32 [out, G] and, only when it is not `column // group_size`, the
group of each column. `apply` runs the Triton W4A16 kernel (`lowbit.kernels.w4a16`) when x is on a
GPU (a kernel that fails to import there is an error); on the CPU the weight is dequantized once
and kept (`cpu_weights.py`).
"""
from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.layers import cpu_weights
from lowbit.layers.cpu_weights import cpu_linear
from lowbit.layers.linear import LinearMethod, register_method
from lowbit.formats import awq_format, gptq_format


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor | None,
                     dtype: torch.dtype) -> torch.Tensor:
    """[out, in] weight in `dtype`: w = (code - zero) * scale of the column's group. Without g_idx the
    groups are contiguous, so broadcasting over [out, G, group] replaces the gather."""
    if g_idx is None:
        out_f, in_f = codes.shape
        n_groups = scales.shape[1]
        w = codes.view(out_f, n_groups, in_f // n_groups).to(dtype)  # a fresh tensor: safe to work in place
        return w.sub_(zeros[..., None].to(dtype)).mul_(scales[..., None].to(dtype)).view(out_f, in_f)
    return codes.to(dtype).sub_(zeros[:, g_idx].to(dtype)).mul_(scales[:, g_idx].to(dtype))


class PackedLinearMethod(LinearMethod):
    """What AWQ and GPTQ share: tensors by checkpoint name, the compute form, the two matmul paths."""

    int_tensors = ("qweight", "qzeros", "g_idx")

    def __init__(self, bits: int, group_size: int, prefix: str = "", **options):
        self.bits, self.group_size, self.prefix = bits, group_size, prefix
        self.options = options  # zero_point / sym / desc_act, as the checkpoint declares them
        self._kernel_weight = None

    def shapes(self, in_features: int, out_features: int) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def unpack(self, layer):
        """-> codes uint8 [out, in], scales [out, G], zeros int32 [out, G], g_idx int32 [in] or None."""
        raise NotImplementedError

    def create_weights(self, layer, dtype):
        in_f, out_f = layer.in_features, layer.out_features
        if self.group_size != -1 and in_f % self.group_size:
            raise LowbitError(f"{self.prefix}: quantization_config.group_size {self.group_size} does not divide "
                              f"in_features {in_f}; the checkpoint does not match its config.json")
        for name, shape in self.shapes(in_f, out_f).items():
            layer.register_buffer(name, torch.empty(shape, dtype=torch.int32 if name in self.int_tensors else dtype))

    def output_dim(self, tensor):
        # AWQ and GPTQ both store [in-ish, out-ish] (qweight, qzeros, scales); g_idx runs over inputs
        return None if tensor == "g_idx" else 1

    def after_load(self, layer):
        self._unpack_into(layer)
        self._kernel_weight = None
        if layer.qweight.is_cuda and self._gpu_kernel(layer) is not None:
            # the kernel holds its own copy of the codes; drop ours (1 byte a weight) and rebuild
            # them from the checkpoint tensors only if a CPU matmul or dequantize() asks
            layer.codes_nxk = None

    def _unpack_into(self, layer) -> None:
        """The compute form as non-persistent buffers: moved by .to(), absent from state_dict (the
        checkpoint tensors stay the truth). A g_idx equal to column // group is dropped."""
        codes, scales, zeros, g_idx = self.unpack(layer)
        n_groups = scales.shape[1]
        if g_idx is not None:
            if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
                raise LowbitError(f"{self.prefix}.g_idx: group indices must lie in [0, {n_groups}); "
                                  f"found {int(g_idx.min())}..{int(g_idx.max())}")
            natural = torch.arange(layer.in_features, device=g_idx.device) // (layer.in_features // n_groups)
            g_idx = None if torch.equal(g_idx.long(), natural) else g_idx.long()
        layer.register_buffer("codes_nxk", codes, persistent=False)
        layer.register_buffer("scales_nxg", scales, persistent=False)
        layer.register_buffer("zeros_nxg", zeros, persistent=False)
        layer.register_buffer("g_idx_k", g_idx, persistent=False)

    def _gpu_kernel(self, layer):
        """The W4A16 kernel's packed weight, built once (a kernel module that fails to import raises); None where it
        does not take this bit width (it declares SUPPORTED_BITS; 4 where it does not say).
        _kernel_weight: None = not tried yet, False = not available."""
        if self._kernel_weight is None:
            try:  # asked on CUDA only: Triton is the optional `kernels` extra, absent from a CPU install
                from lowbit.kernels import w4a16
            except Exception as e:  # no Triton, or a module that breaks at import: an error, not a slow path
                raise LowbitError(f"{self.prefix}: lowbit.kernels.w4a16 failed to import ({type(e).__name__}: {e}); "
                                  "install the GPU kernels (pip install 'lowbit[kernels]') or run on the CPU "
                                  "(--device cpu)") from e
            self._kernel_weight = False
            if self.bits in getattr(w4a16, "SUPPORTED_BITS", (4,)):
                g_idx = layer.g_idx_k.to(torch.int32) if layer.g_idx_k is not None else None
                self._kernel_weight = w4a16.pack_w4a16(layer.codes_nxk, layer.scales_nxg, layer.zeros_nxg,
                                                       self.group_size, g_idx=g_idx, bits=self.bits)
        return self._kernel_weight or None

    def _dense(self, layer, dtype) -> torch.Tensor:
        if layer.codes_nxk is None:
            if getattr(layer, "qweight", None) is None:  # a tensor-parallel shard keeps only the kernel's copy
                raise LowbitError(f"{self.prefix}: this shard's weights live in the GPU kernel's layout only; "
                                  "dequantize the unsharded model instead")
            self._unpack_into(layer)
        return dequantize_codes(layer.codes_nxk, layer.scales_nxg, layer.zeros_nxg, layer.g_idx_k, dtype)

    def apply(self, layer, x):
        if x.is_cuda and self._gpu_kernel(layer) is not None:
            from lowbit.kernels.w4a16 import w4a16_matmul

            y = w4a16_matmul(x, self._kernel_weight)
            return y + layer.bias if layer.bias is not None else y
        if x.device.type == "cpu":  # dequantized once and kept: cpu_weights.py says why and what it costs
            return cpu_linear(layer, x, lambda dtype: self._dense(layer, dtype))
        return nn.functional.linear(x, self._dense(layer, x.dtype), layer.bias)

    def dequantize(self, layer):
        return self._dense(layer, torch.float32)

    def select(self, layer, dim, index):
        """A shard of the compute form (codes, scales, zeros, g_idx); the checkpoint's packed tensors
        are dropped (they describe the whole layer) and the kernel's weight is rebuilt from it."""
        if layer.codes_nxk is None:  # the GPU kernel's weight replaced them: unpack once more
            self._unpack_into(layer)
        codes, scales, zeros, g_idx = layer.codes_nxk, layer.scales_nxg, layer.zeros_nxg, layer.g_idx_k
        index = index.to(codes.device)
        if dim == 0:
            codes, scales, zeros = codes[index], scales[index], zeros[index]
        else:
            start, stop = int(index[0]), int(index[-1]) + 1  # a contiguous range of inputs
            if g_idx is not None:  # each column names its group: the kept columns keep theirs
                g_idx = g_idx[start:stop]
            elif scales.shape[1] > 1:  # natural groups: the slice must cut between them
                gs = layer.in_features // scales.shape[1]
                if start % gs or stop % gs:
                    raise LowbitError(f"{self.prefix}: group size {gs} does not divide this rank's inputs "
                                      f"[{start}, {stop}); use a tensor-parallel size that splits the "
                                      f"{layer.in_features} inputs into whole groups")
                scales, zeros = scales[:, start // gs:stop // gs], zeros[:, start // gs:stop // gs]
            codes = codes[:, start:stop]
        for name in self.shapes(layer.in_features, layer.out_features):  # the whole layer's packing
            setattr(layer, name, None)
        layer.codes_nxk, layer.scales_nxg = codes.contiguous(), scales.contiguous()
        layer.zeros_nxg, layer.g_idx_k = zeros.contiguous(), g_idx
        self._kernel_weight = None
        cpu_weights.drop_kept(layer)
        if codes.is_cuda and self._gpu_kernel(layer) is not None:
            layer.codes_nxk = None


class AWQLinearMethod(PackedLinearMethod):
    """AutoAWQ GEMM (`version: "gemm"`), 4-bit; see lowbit/formats/awq_format.py for the layout."""

    name = "awq"

    def create_weights(self, layer, dtype):
        if layer.out_features % awq_format.PACK:
            raise LowbitError(f"{self.prefix}: out_features {layer.out_features} is not a multiple of "
                              f"{awq_format.PACK}, which the awq gemm layout needs")
        super().create_weights(layer, dtype)

    def shapes(self, in_features, out_features):
        return awq_format.shapes(in_features, out_features, self.group_size)

    def unpack(self, layer):
        codes, scales, zeros = awq_format.unpack(layer.qweight, layer.qzeros, layer.scales)
        return codes, scales, zeros, None


class GPTQLinearMethod(PackedLinearMethod):
    """AutoGPTQ / GPTQModel (`checkpoint_format` gptq or gptq_v2), 2/3/4/8-bit, with g_idx."""

    name = "gptq"

    def __init__(self, bits, group_size, prefix="", zero_offset: int = 1, **options):
        super().__init__(bits, group_size, prefix, **options)
        self.zero_offset = zero_offset  # 1 for v1 checkpoints (zero - 1 stored), 0 for gptq_v2

    def create_weights(self, layer, dtype):
        for what, n in (("in_features", layer.in_features), ("out_features", layer.out_features)):
            if n % 32:
                raise LowbitError(f"{self.prefix}: {what} {n} is not a multiple of 32, which the gptq layout "
                                  f"needs to pack {self.bits}-bit codes into whole int32 words")
        super().create_weights(layer, dtype)

    def shapes(self, in_features, out_features):
        return gptq_format.shapes(in_features, out_features, self.bits, self.group_size)

    def unpack(self, layer):
        return gptq_format.unpack(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, self.bits,
                                  self.zero_offset)


register_method("awq", AWQLinearMethod)
register_method("gptq", GPTQLinearMethod)
