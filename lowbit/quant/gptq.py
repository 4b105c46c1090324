"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"): quantize a weight matrix one input column at a time, each time spreading the
column's rounding error over the columns not yet quantized, weighted by the inverse Hessian of the
layer-wise objective ||W X - W_hat X||^2 (the Optimal Brain Quantization update, paper eq. 2-3).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.quant.driver import SEQUENTIAL_GROUPS, LayerInputs, set_weight
from lowbit.quant.qweight import QuantizedWeight
from lowbit.quant.rtn import check_bits, codes_for, group_scale_zero, group_size_of

BLOCK_COLUMNS = 128  # paper section "Lazy Batch-Updates": B = 128 columns per block


class HessianAccumulator:
    """H = 2 X X^T / n_tokens over every calibration token (paper section 3, "the Hessian"),
    kept as a running mean so batches of any size can be added."""

    def __init__(self, in_features: int, device):
        self.h_in_in = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n_tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x_tok_in = x.reshape(-1, x.shape[-1]).float()  # [tokens, in]
        n = x_tok_in.shape[0]
        self.h_in_in *= self.n_tokens / (self.n_tokens + n)
        self.n_tokens += n
        x_tok_in = x_tok_in * (2 / self.n_tokens) ** 0.5
        self.h_in_in += x_tok_in.T @ x_tok_in


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int = 128,
                  symmetric: bool = False, act_order: bool = False, static_groups: bool = False,
                  damp_percent: float = 0.01, block_columns: int = BLOCK_COLUMNS, mse: bool = False,
                  name: str = "weight") -> QuantizedWeight:
    """weight [out, in], hessian [in, in] -> QuantizedWeight.

    act_order: quantize columns by descending diag(H) (the "desc_act" heuristic of the GPTQ
    repository), so the columns with the largest activations are rounded while the most columns are
    left to absorb their error. With static_groups each group's scale/zero is computed from the
    original weights before the permutation, so groups stay the natural `column // group_size` and
    g_idx is not needed; without it the groups follow the permuted order and g_idx records them.
    Without act_order, static_groups changes nothing: each group's scale/zero is computed when its
    first column is reached, from the weights as the earlier columns' error updates left them.
    mse: each group's range is the shrunk one with the lowest rounding error (rtn.group_scale_zero).
    """
    check_bits(bits)
    out_f, in_f = weight.shape
    gs = group_size_of(in_f, group_size)
    if in_f % gs:
        raise LowbitError(f"{name}: group size {group_size} does not divide in_features {in_f}")
    # whole groups per block, so a group's scale is taken from columns that already carry every
    # earlier error update (the reference code reads partly stale columns there)
    if gs < in_f:
        block_columns = max(gs, (block_columns // gs) * gs)
    w = weight.float().clone()  # [out, in]
    h = hessian.float().clone()  # [in, in]

    # dead inputs (never active in calibration) carry no information: fix their weight to 0
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0

    n_groups = in_f // gs
    scales = torch.zeros(out_f, n_groups, device=w.device)
    zeros = torch.zeros(out_f, n_groups, dtype=torch.int32, device=w.device)
    # Static groups (act-order only) take their parameters from the weights before any update. Without
    # act-order that would be wrong: the error updates move later columns outside the range measured
    # on the original weights, and those weights are then clamped (this was lowbit's default until
    # issue 11, and it made GPTQ without act-order worse than RTN).
    static_groups = static_groups and act_order
    if static_groups or gs == in_f:
        for g in range(n_groups):
            scales[:, g], zeros[:, g] = group_scale_zero(w[:, g * gs:(g + 1) * gs], bits, symmetric, mse)

    perm = torch.arange(in_f, device=w.device)
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]

    # dampening lambda = 1% of the mean diagonal (paper section 3, "Cholesky reformulation")
    h += damp_percent * torch.mean(torch.diag(h)) * torch.eye(in_f, device=w.device)
    # Step 3 of the paper: the rows of H^-1 that the column-by-column updates need are exactly the
    # rows of the upper Cholesky factor of H^-1 (scaled), precomputed once for numerical stability.
    try:
        h_inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
        h_inv_upper = torch.linalg.cholesky(h_inv, upper=True)
    except torch.linalg.LinAlgError:
        raise LowbitError(f"{name}: the calibration Hessian is not positive definite even after dampening; "
                          f"use more --calib-samples or a larger damping") from None

    codes = torch.zeros(out_f, in_f, dtype=torch.int32, device=w.device)  # in permuted column order
    group_of_pos = (perm // gs) if static_groups else (torch.arange(in_f, device=w.device) // gs)
    for b0 in range(0, in_f, block_columns):
        b1 = min(b0 + block_columns, in_f)
        w_blk = w[:, b0:b1].clone()
        err_blk = torch.zeros_like(w_blk)
        hinv_blk = h_inv_upper[b0:b1, b0:b1]
        for j in range(b1 - b0):
            col = b0 + j
            if not static_groups and gs < in_f and col % gs == 0:
                # dynamic groups: params from the group's columns as they are now (error-updated)
                scales[:, col // gs], zeros[:, col // gs] = group_scale_zero(w_blk[:, j:j + gs], bits, symmetric, mse)
            g = group_of_pos[col]
            scale, zero = scales[:, g], zeros[:, g]
            q = codes_for(w_blk[:, j], scale, zero, bits)
            codes[:, col] = q
            w_hat = (q - zero) * scale
            # OBQ update (paper eq. 3): spread the rounding error over the remaining columns
            err = (w_blk[:, j] - w_hat) / hinv_blk[j, j]
            w_blk[:, j:] -= err[:, None] * hinv_blk[j, j:][None, :]
            err_blk[:, j] = err
        # lazy batch update (paper section "Lazy Batch-Updates"): the rest of W at once
        w[:, b1:] -= err_blk @ h_inv_upper[b0:b1, b1:]

    inv_perm = torch.argsort(perm)
    codes = codes[:, inv_perm]
    g_idx = None
    if act_order and not static_groups and gs < in_f:
        g_idx = (inv_perm // gs).to(torch.int32)  # the group of natural column c = its position // gs
    return QuantizedWeight(codes=codes.to(torch.uint8).cpu(), scales=scales.cpu(), zeros=zeros.cpu(), bits=bits,
                           group_size=group_size, g_idx=None if g_idx is None else g_idx.cpu(), symmetric=symmetric)


@dataclass
class GPTQMethod:
    """The driver's per-layer hook: true-sequential groups (q/k/v, o, gate/up, down), each
    calibrated on the outputs of the already-quantized groups before it."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    act_order: bool = False
    static_groups: bool = False
    damp_percent: float = 0.01
    mse: bool = False
    next_inputs_fp: bool = False  # calibrate the next layer on this one's full-precision outputs (driver.py)
    needs_calibration: bool = True

    def quantize_layer(self, layer: nn.Module, inputs: LayerInputs, prefix: str) -> dict[str, QuantizedWeight]:
        out = {}
        for group in SEQUENTIAL_GROUPS:
            dev = inputs.hidden[0].device
            acc = {n: HessianAccumulator(layer.get_submodule(n).in_features, dev) for n in group}
            inputs.capture(layer, group, lambda n, x: acc[n].add(x))
            for n in group:
                linear = layer.get_submodule(n)
                bits, group_size = self.setting(f"{prefix}.{n}")
                qw = gptq_quantize(linear.weight.data, acc[n].h_in_in, bits, group_size, self.symmetric,
                                   self.act_order, self.static_groups, self.damp_percent, mse=self.mse, name=f"{prefix}.{n}")
                self.quantized(f"{prefix}.{n}", linear.weight.data, qw, acc[n].h_in_in)
                set_weight(linear, qw)
                out[n] = qw
        return out

    def setting(self, key: str) -> tuple[int, int]:
        """(bits, group_size) of linear `key`: one for all here; per linear in quant/mixed.py."""
        return self.bits, self.group_size

    def quantized(self, key: str, weight: torch.Tensor, qw: QuantizedWeight, hessian: torch.Tensor) -> None:
        """Called with each linear's full-precision weight and result before the weight is replaced
        (quant/mixed.py records the output error there)."""
