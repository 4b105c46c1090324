"""SmoothQuant (Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization for
Large Language Models"). Activations have a few input channels with outliers ~100x the rest, which
per-token int8 cannot hold; weights do not. Dividing input channel j by s_j and multiplying the
weight's column j by s_j is exact in full precision (Y = (X diag(s)^-1)(diag(s) W^T)) and moves the
difficulty from activations to weights; paper eq. 4:

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

with max|X_j| over the calibration tokens and max|W_j| over the output rows of every consumer of
that input. 1/s is folded into what produces X: the RMSNorm weight before q/k/v and before
gate/up, and v_proj's output rows before o_proj (with grouped-query attention one v channel feeds
the same column of every query head of its group, so those columns share one scale). `alpha` is
given, or searched per (producer, consumers) pair on a grid by the block's output error on the
calibration data with weights and activations rounded, as AWQ's scale search is (quant/awq.py);
"no smoothing" (s = 1, reported as alpha None) is a candidate too, so the search never does worse
than plain W8A8 on the calibration data (alpha = 0 is s = 1 / max|W_j|, not s = 1).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from lowbit.formats.compressed_tensors import W8A8Scheme
from lowbit.quant.driver import LINEAR_NAMES, LayerInputs
from lowbit.quant.w8a8 import InputRounding, W8Weight, pseudo_quantize_weight, quantize_linears, static_input_scale

ALPHA_GRID = (None, *(i / 10 for i in range(11)))  # no smoothing, 0, 0.1, ..., 1
MIN_SCALE = 1e-5  # SmoothQuant's clamp of both max|W_j| and s_j
# the architectures whose decoder (lowbit/models/llama.py) has this smoothing map: RMSNorm before
# q/k/v and before gate/up, v_proj before o_proj
SMOOTHABLE = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "InternLM2ForCausalLM")
# which captured input (by its first consumer) each linear reads
INPUT_OF = {"self_attn.q_proj": "self_attn.q_proj", "self_attn.k_proj": "self_attn.q_proj",
            "self_attn.v_proj": "self_attn.q_proj", "self_attn.o_proj": "self_attn.o_proj",
            "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.gate_proj", "mlp.down_proj": "mlp.down_proj"}


def channel_absmax(x_batches: list[torch.Tensor]) -> torch.Tensor:
    """float32 [in]: max |x_j| over every calibration token."""
    return torch.stack([x.reshape(-1, x.shape[-1]).abs().amax(0).float() for x in x_batches]).amax(0)


def weight_absmax(linears: list[nn.Module]) -> torch.Tensor:
    """float32 [in]: max |W_j| over the output rows of every consumer."""
    return torch.cat([lin.weight.data for lin in linears]).abs().amax(0).float()


def smoothing_scales(act_max: torch.Tensor, w_max: torch.Tensor, alpha: float | None) -> torch.Tensor:
    """Paper eq. 4; a channel that is never active (or has no weight) keeps s = 1; alpha None: all 1."""
    if alpha is None:
        return torch.ones_like(act_max)
    s = act_max.pow(alpha) / w_max.clamp(min=MIN_SCALE).pow(1 - alpha)
    s = s.clamp(min=MIN_SCALE)
    return torch.where((act_max > 0) & (w_max > 0), s, torch.ones_like(s))


@dataclass
class SmoothPair:
    """One producer -> consumers edge. `expand` maps each consumer input column to its producer
    channel (None: one to one); the scale lives on producer channels."""

    prev: nn.Module  # RMSNorm (weight [in]) or a linear (output rows)
    linears: list[nn.Module]
    block: Callable[[torch.Tensor], torch.Tensor]  # whose output error the search measures
    feat: str  # the captured input, by its first consumer's name
    expand: torch.Tensor | None = None  # int64 [consumer in]: producer channel of each column

    def reduce(self, per_column: torch.Tensor) -> torch.Tensor:
        """A per-column statistic -> per producer channel (max over the columns it feeds)."""
        if self.expand is None:
            return per_column
        n = int(self.expand.max()) + 1
        out = torch.zeros(n, dtype=per_column.dtype, device=per_column.device)
        return out.scatter_reduce(0, self.expand.to(per_column.device), per_column, "amax", include_self=False)

    def columns(self, s: torch.Tensor) -> torch.Tensor:
        return s if self.expand is None else s[self.expand.to(s.device)]

    def fold(self, s: torch.Tensor) -> None:
        """prev /= s, consumer columns *= s: exact in full precision."""
        s_prev = s.to(self.prev.weight.dtype)
        if self.prev.weight.dim() == 1:  # RMSNorm: y = x / rms(x) * weight
            self.prev.weight.data.div_(s_prev)
        else:
            self.prev.weight.data.div_(s_prev[:, None])
            if getattr(self.prev, "bias", None) is not None:
                self.prev.bias.data.div_(s_prev)
        s_col = self.columns(s).to(self.linears[0].weight.dtype)
        for lin in self.linears:
            lin.weight.data.mul_(s_col[None, :])


def smooth_pairs(layer: nn.Module, cos: torch.Tensor, sin: torch.Tensor) -> list[SmoothPair]:
    attn, mlp = layer.self_attn, layer.mlp
    pairs = [SmoothPair(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj],
                        lambda x: attn(x, cos, sin, None, layer.idx), "self_attn.q_proj")]
    # v -> o: o's input column (query head h, dim d) is a mix of v channel (kv head of h, dim d)
    d, rep = attn.head_dim, attn.n_heads // attn.n_kv
    if attn.n_heads % attn.n_kv == 0 and attn.o_proj.in_features == attn.n_heads * d:
        col = torch.arange(attn.n_heads * d)
        expand = (col // d // rep) * d + col % d
        pairs.append(SmoothPair(attn.v_proj, [attn.o_proj], attn.o_proj, "self_attn.o_proj",
                                None if rep == 1 else expand))
    pairs.append(SmoothPair(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], mlp, "mlp.gate_proj"))
    # up -> down (down reads silu(gate) * up, linear in up's output rows), beyond the paper's q/k/v and
    # fc1: SmolLM2's down_proj inputs hold "massive activations" (one channel of a few tokens ~1e3x the
    # rest), and rounding them per token alone turns the default model's answers to noise
    pairs.append(SmoothPair(mlp.up_proj, [mlp.down_proj], mlp.down_proj, "mlp.down_proj"))
    return pairs


def search_alpha(pair: SmoothPair, x_batches: list[torch.Tensor], scheme: W8A8Scheme,
                 grid=ALPHA_GRID) -> tuple[float | None, list[float]]:
    """The alpha on `grid` whose smoothing, with weights and activations rounded, gives the block the
    lowest output MSE against full precision on the calibration inputs; (alpha, loss per alpha)."""
    act_max = pair.reduce(channel_absmax(x_batches))
    w_max = pair.reduce(weight_absmax(pair.linears))
    w_orig = [lin.weight.data.clone() for lin in pair.linears]
    losses = []
    with torch.no_grad():
        ref = [pair.block(x) for x in x_batches]
        for alpha in grid:
            s_col = pair.columns(smoothing_scales(act_max, w_max, alpha)).to(w_orig[0].device)
            x_scale = None
            if not scheme.act_dynamic:
                x_scale = static_input_scale([x / s_col.to(x.dtype) for x in x_batches], scheme.weight_type)
            hooks = []
            try:
                for lin, w in zip(pair.linears, w_orig):
                    # the block as it will run: Q(W diag(s)) applied to Q(x diag(s)^-1)
                    lin.weight.data = pseudo_quantize_weight(w * s_col.to(w.dtype), scheme.weight_type)
                    hooks.append(lin.register_forward_pre_hook(InputRounding(scheme.weight_type, x_scale, s_col)))
                sq = sum(float((pair.block(x) - r).float().pow(2).sum()) for x, r in zip(x_batches, ref))
            finally:
                for h in hooks:
                    h.remove()
                for lin, w in zip(pair.linears, w_orig):
                    lin.weight.data = w
            losses.append(sq / sum(r.numel() for r in ref))
    best = min(range(len(grid)), key=losses.__getitem__)
    return grid[best], losses


@dataclass
class SmoothQuantMethod:
    """The driver's hook: smooth each (producer, consumers) pair of a layer with a fixed or searched
    alpha, then round every linear to `scheme` (int8 or fp8 per channel)."""

    scheme: W8A8Scheme
    alpha: float | None = 0.5  # None: searched per pair on ALPHA_GRID
    log: Callable[[str], None] | None = None
    alphas: dict[str, dict[str, float | None]] = field(default_factory=dict)  # prefix -> {pair: alpha (None: off)}
    next_inputs_fp: bool = False
    needs_calibration: bool = True

    def quantize_layer(self, layer: nn.Module, inputs: LayerInputs, prefix: str) -> dict[str, W8Weight]:
        firsts = sorted(set(INPUT_OF.values()))
        feats: dict[str, list[torch.Tensor]] = {n: [] for n in firsts}
        inputs.capture(layer, firsts, lambda n, x: feats[n].append(x.clone()))
        chosen = {}
        for pair in smooth_pairs(layer, inputs.cos, inputs.sin):
            if self.alpha is None:
                alpha, _ = search_alpha(pair, feats[pair.feat], self.scheme)
            else:
                alpha = self.alpha
            s = smoothing_scales(pair.reduce(channel_absmax(feats[pair.feat])),
                                 pair.reduce(weight_absmax(pair.linears)), alpha)
            pair.fold(s)
            s_col = pair.columns(s)
            feats[pair.feat] = [x / s_col.to(x.device, x.dtype) for x in feats[pair.feat]]  # what they now see
            chosen[pair.feat.split(".")[-1]] = alpha
        self.alphas[prefix] = chosen
        if self.log:
            self.log(f"{prefix}: alpha " + " ".join(f"{k}={'off' if v is None else f'{v:g}'}" for k, v in chosen.items()))
        captured = None if self.scheme.act_dynamic else {n: feats[INPUT_OF[n]] for n in LINEAR_NAMES}
        return quantize_linears(layer, LINEAR_NAMES, self.scheme.weight_type, captured)
