"""AWQ (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration"). Scaling input channel j of a linear by s_j (and the layer before it by 1/s_j) is
exact in full precision but shrinks the relative rounding error of the salient channels, those with
large activations (paper section 3.2, eq. 4-5). s = mean|x|^alpha with alpha searched on a grid by
the output error of the block after pseudo-quantization (eq. 5); then each linear's weight range
is shrunk where clipping lowers its output error (the llm-awq `auto_clip` step).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from lowbit.quant.driver import LayerInputs, set_weight
from lowbit.quant.qweight import QuantizedWeight
from lowbit.quant.rtn import group_size_of, pseudo_quantize, quantize_rtn

N_GRID = 20  # alpha in {0, 1/20, ..., 19/20}, the paper's grid of 20 points
CLIP_MAX_SHRINK = 0.5  # try max |w| * (1 - i/20) for i < 10, as llm-awq does
CLIP_TOKENS = 512  # tokens the clip search measures output error on (llm-awq n_sample_token)
CLIP_OUT_CHUNK = 64  # output channels per step of the clip search, to bound its memory


def activation_mean_abs(x_batches: list[torch.Tensor]) -> torch.Tensor:
    """float32 [in]: mean |x| per input channel over every calibration token (paper eq. 5, s_X)."""
    total = sum(x.float().abs().reshape(-1, x.shape[-1]).sum(0) for x in x_batches)
    n = sum(x.numel() // x.shape[-1] for x in x_batches)
    return total / n


def weight_mean_rel(linears: list[nn.Module], group_size: int) -> torch.Tensor:
    """float32 [in]: mean over output rows of |w| relative to its group's max |w|, the weight
    magnitude term of AutoAWQ's "duo" scaling s = s_X^alpha / s_W^(1-alpha)."""
    w = torch.cat([lin.weight.data for lin in linears]).float().abs()  # [sum out, in]
    out_f, in_f = w.shape
    gs = group_size_of(in_f, group_size)
    w = w.view(out_f, in_f // gs, gs)
    w = (w / w.amax(-1, keepdim=True).clamp(min=1e-8)).view(out_f, in_f)
    return w.mean(0)


def search_scales(block: Callable[[torch.Tensor], torch.Tensor], x_batches: list[torch.Tensor],
                  linears: list[nn.Module], bits: int, group_size: int, symmetric: bool,
                  n_grid: int = N_GRID, duo: bool = False) -> tuple[torch.Tensor, list[float]]:
    """Grid search of eq. 5: returns (scales float32 [in], output MSE for each alpha on the grid).
    alpha = 0 is s = 1, plain RTN, so the choice is never worse than no scaling on this data."""
    with torch.no_grad():
        ref_out = [block(x) for x in x_batches]
        x_mean = activation_mean_abs(x_batches)
        w_mean = weight_mean_rel(linears, group_size) if duo else None
        w_orig = [lin.weight.data.clone() for lin in linears]
        losses, best, best_scales = [], float("inf"), None
        try:
            for i in range(n_grid):
                alpha = i / n_grid
                s = x_mean.pow(alpha).clamp(min=1e-4)
                if w_mean is not None:
                    s = (s / (w_mean.pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
                s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1 (llm-awq)
                s_w = s.to(w_orig[0].dtype)
                for lin, w in zip(linears, w_orig):
                    # W' = Q(W diag(s)) diag(s)^-1: what the block computes once the scale is folded
                    lin.weight.data = pseudo_quantize(w * s_w, bits, group_size, symmetric) / s_w
                sq = sum(float((block(x) - r).float().pow(2).sum()) for x, r in zip(x_batches, ref_out))
                loss = sq / sum(r.numel() for r in ref_out)
                losses.append(loss)
                if loss < best:
                    best, best_scales = loss, s.clone()
        finally:
            for lin, w in zip(linears, w_orig):
                lin.weight.data = w
    return best_scales, losses


def fold_scales(prev: nn.Module, linears: list[nn.Module], scales: torch.Tensor) -> None:
    """Divide the producer of the input by s and multiply the consumers' input columns by s:
    exact in full precision. `prev` is an RMSNorm (its weight) or a linear (its output rows)."""
    s = scales.to(linears[0].weight.dtype)
    if prev.weight.dim() == 1:  # RMSNorm: y = x / rms(x) * weight
        prev.weight.data.div_(s)
    else:
        prev.weight.data.div_(s[:, None])
        if getattr(prev, "bias", None) is not None:
            prev.bias.data.div_(s)
    for lin in linears:
        lin.weight.data.mul_(s[None, :])


def search_clip(weight: torch.Tensor, x_batches: list[torch.Tensor], bits: int, group_size: int, symmetric: bool,
                n_grid: int = N_GRID, max_shrink: float = CLIP_MAX_SHRINK, n_tokens: int = CLIP_TOKENS
                ) -> torch.Tensor:
    """Per (output channel, group) clipping threshold [out, n_groups, 1] minimising the group's
    contribution to the output error on a subset of tokens (llm-awq auto_clip)."""
    out_f, in_f = weight.shape
    gs = group_size_of(in_f, group_size)
    n_groups = in_f // gs
    x_tok_in = torch.cat([x.reshape(-1, in_f) for x in x_batches])
    x_tok_in = x_tok_in[:: max(1, x_tok_in.shape[0] // n_tokens)].float()
    x_g_tok_k = x_tok_in.view(-1, n_groups, gs).transpose(0, 1)  # [n_groups, tokens, group]
    best_max = torch.empty(out_f, n_groups, 1, device=weight.device)
    with torch.no_grad():
        for o0 in range(0, out_f, CLIP_OUT_CHUNK):
            w = weight[o0:o0 + CLIP_OUT_CHUNK].float().view(-1, n_groups, gs)  # [oc, n_groups, group]
            org_max = w.abs().amax(-1, keepdim=True)  # [oc, n_groups, 1]
            # per-group partial outputs: [n_groups, tokens, group] @ [n_groups, group, oc]
            ref = torch.bmm(x_g_tok_k, w.permute(1, 2, 0))
            best_err = torch.full_like(org_max, float("inf"))
            chunk_best = org_max.clone()
            for i in range(int(max_shrink * n_grid)):
                max_val = org_max * (1 - i / n_grid)
                w_clip = torch.maximum(torch.minimum(w, max_val), -max_val)
                w_hat = pseudo_quantize(w_clip.reshape(w.shape[0], in_f), bits, group_size, symmetric)
                out = torch.bmm(x_g_tok_k, w_hat.view(-1, n_groups, gs).permute(1, 2, 0))
                err = (out - ref).pow(2).mean(1).T[..., None]  # [oc, n_groups, 1]
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                chunk_best = torch.where(better, max_val, chunk_best)
            best_max[o0:o0 + CLIP_OUT_CHUNK] = chunk_best
    return best_max


def apply_clip(linear: nn.Module, max_val: torch.Tensor) -> None:
    out_f, in_f = linear.weight.shape
    n_groups = max_val.shape[1]
    w = linear.weight.data.view(out_f, n_groups, -1)
    m = max_val.to(w.dtype)
    w.copy_(torch.maximum(torch.minimum(w, m), -m))


@dataclass
class AWQMethod:
    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    clip: bool = True
    n_grid: int = N_GRID
    duo: bool = True  # AutoAWQ's default; w4g64 on the default model: ppl 26.16 -> 25.99
    next_inputs_fp: bool = False  # llm-awq / AutoAWQ feed the next layer full-precision outputs (driver.py)
    needs_calibration: bool = True

    def quantize_layer(self, layer: nn.Module, inputs: LayerInputs, prefix: str) -> dict[str, QuantizedWeight]:
        feats = scale_layer(layer, inputs, self.bits, self.group_size, self.symmetric, self.n_grid, self.duo)
        out = {}
        for name, feat in INPUTS_OF.items():
            linear = layer.get_submodule(name)
            # q/k are not clipped: their error is judged through the softmax, not a linear output (llm-awq)
            if self.clip and name not in ("self_attn.q_proj", "self_attn.k_proj"):
                apply_clip(linear, search_clip(linear.weight.data, feats[feat], self.bits, self.group_size,
                                               self.symmetric))
            qw = quantize_rtn(linear.weight.data, self.bits, self.group_size, self.symmetric)
            set_weight(linear, qw)
            out[name] = qw
        return out


# which captured input (by its first consumer) each linear reads
INPUTS_OF = {"self_attn.q_proj": "q_proj", "self_attn.k_proj": "q_proj", "self_attn.v_proj": "q_proj",
             "self_attn.o_proj": "o_proj", "mlp.gate_proj": "gate_proj", "mlp.up_proj": "gate_proj",
             "mlp.down_proj": "down_proj"}


def scale_layer(layer: nn.Module, inputs: LayerInputs, bits: int, group_size: int, symmetric: bool,
                n_grid: int = N_GRID, duo: bool = True) -> dict[str, list[torch.Tensor]]:
    """Search and fold AWQ's scales for every (producer, consumers) pair of one decoder layer, in
    place (exact in full precision); returns the consumers' captured inputs, divided by the scales."""
    attn, mlp = layer.self_attn, layer.mlp
    feats: dict[str, list[torch.Tensor]] = {n: [] for n in ("q_proj", "o_proj", "gate_proj", "down_proj")}
    names = {"self_attn.q_proj": "q_proj", "self_attn.o_proj": "o_proj", "mlp.gate_proj": "gate_proj",
             "mlp.down_proj": "down_proj"}
    inputs.capture(layer, names, lambda n, x: feats[names[n]].append(x.clone()))
    cos, sin = inputs.cos, inputs.sin
    # (producer, consumers, block whose output error is measured, captured input) as in llm-awq
    groups = [(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj],
               lambda x: attn(x, cos, sin, None, layer.idx), "q_proj")]
    # v -> o only when v's outputs map one to one onto o's inputs; with grouped-query attention
    # (fewer KV heads) one v channel feeds several o columns, so llm-awq skips it, and so do we
    if attn.v_proj.weight.shape == attn.o_proj.weight.shape:
        groups.append((attn.v_proj, [attn.o_proj], attn.o_proj, "o_proj"))
    groups.append((layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], mlp, "gate_proj"))
    groups.append((mlp.up_proj, [mlp.down_proj], mlp.down_proj, "down_proj"))
    for prev, linears, block, feat in groups:
        scales, _ = search_scales(block, feats[feat], linears, bits, group_size, symmetric, n_grid, duo)
        fold_scales(prev, linears, scales)
        s = scales.to(feats[feat][0].dtype)
        feats[feat] = [x / s for x in feats[feat]]  # the consumers now see x / s
    return feats
