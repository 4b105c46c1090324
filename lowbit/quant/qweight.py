"""The one hand-off between quantization algorithms and weight formats.

An algorithm (rtn, awq, gptq) returns a `QuantizedWeight` per linear layer: unpacked integer
codes plus per-group scales and integer zero points. A format (AWQ gemm, GPTQ) packs it for disk;
a LinearMethod unpacks it for compute. Nothing here knows about files or kernels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    codes: torch.Tensor  # uint8 [out, in], each in [0, 2**bits)
    scales: torch.Tensor  # float32 [out, n_groups]
    zeros: torch.Tensor  # int32 [out, n_groups], each in [0, 2**bits); symmetric uses 2**(bits-1)
    bits: int
    group_size: int  # -1: one group over the whole input dim (per output channel)
    # act-order (GPTQ desc_act): the group of each input column, int32 [in]; None = column // group_size
    g_idx: torch.Tensor | None = None
    symmetric: bool = False

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    def group_index(self) -> torch.Tensor:
        """int64 [in]: which group (column of scales/zeros) each input column uses."""
        if self.g_idx is not None:
            return self.g_idx.long()
        gs = self.in_features if self.group_size == -1 else self.group_size
        return torch.arange(self.in_features, device=self.codes.device) // gs

    def dequantize(self) -> torch.Tensor:
        """float32 [out, in]: w = (code - zero) * scale, with the column's group."""
        g = self.group_index()
        return (self.codes.float() - self.zeros[:, g].float()) * self.scales[:, g].float()
