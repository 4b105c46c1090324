"""The Llama-family decoder: Llama 2/3, Mistral, Qwen2, SmolLM2, InternLM2 (after its weights are
renamed on load). Plain PyTorch; every projection is a `QLinear`, so the weight format is decided
when the layers are built, never here."""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

from lowbit.config import ModelConfig
from lowbit.errors import LowbitError
from lowbit.layers.activation import silu_and_mul
from lowbit.layers.attention import gqa_attention
from lowbit.layers.linear import LinearMethod, QLinear, dense_linear, projections
from lowbit.layers.norm import RMSNorm
from lowbit.layers.rotary import RotaryEmbedding, apply_rotary

# (layer name, in_features, out_features) -> the weight format of that projection.
MethodFor = Callable[[str, int, int], LinearMethod | None]

# The projections that share an input, by the checkpoint's names: one merged QLinear each when fused.
QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")
MERGED = (("self_attn", QKV), ("mlp", GATE_UP))

# Tensor parallelism (Megatron-LM's split, QLinear.shard): each rank keeps its share of the attention
# heads and of the MLP's hidden units; o_proj and down_proj sum the ranks' partial products; the
# output head splits the vocabulary and gathers the logits.
TP_PLAN = {"qkv_proj": "column", "q_proj": "column", "k_proj": "column", "v_proj": "column",
           "gate_up_proj": "column", "gate_proj": "column", "up_proj": "column",
           "o_proj": "row", "down_proj": "row", "lm_head": "column_gather"}


def _dense(_name, _i, _o):
    return None


def shard_linears(root: nn.Module, rank: int, world: int) -> None:
    """Keeps rank `rank`'s part of every linear under `root`, split the way TP_PLAN names it."""
    for name, module in root.named_modules():
        style = TP_PLAN.get(name.rpartition(".")[2])
        if style and isinstance(module, QLinear):
            module.shard(style, rank, world)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, prefix: str, method_for: MethodFor, dtype, fused: bool):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.sliding_window = cfg.sliding_window
        qkv = list(zip(QKV, (self.n_heads * d, self.n_kv * d, self.n_kv * d)))
        for name, lin in projections(prefix, "qkv_proj", qkv, h, cfg.qkv_bias, method_for, dtype, fused).items():
            setattr(self, name, lin)
        self.o_proj = QLinear(self.n_heads * d, h, cfg.o_bias, method_for(f"{prefix}.o_proj", self.n_heads * d, h), dtype)

    def qkv(self, x):
        if hasattr(self, "qkv_proj"):  # one matmul (see `projections`)
            return self.qkv_proj.split(self.qkv_proj(x))
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, cos, sin, cache, layer_idx: int):
        b, t, _ = x.shape
        q, k, v = self.qkv(x)
        q = q.view(b, t, self.n_heads, self.head_dim)
        k, v = k.view(b, t, self.n_kv, self.head_dim), v.view(b, t, self.n_kv, self.head_dim)
        if cache is None:
            q, k = apply_rotary(q, k, cos, sin)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            out = gqa_attention(q, k, v, self.sliding_window).transpose(1, 2)
        else:  # the cache applies the rotary embedding as it stores the new k/v (on a GPU inside the
            # write's kernel), then attends over everything it holds
            out = cache.attention(layer_idx, q, k, v, cos, sin, self.sliding_window)
        return self.o_proj(out.reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, prefix: str, method_for: MethodFor, dtype, fused: bool):
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        gate_up = [(name, i) for name in GATE_UP]
        for name, lin in projections(prefix, "gate_up_proj", gate_up, h, cfg.mlp_bias, method_for, dtype, fused).items():
            setattr(self, name, lin)
        self.down_proj = QLinear(i, h, cfg.mlp_bias, method_for(f"{prefix}.down_proj", i, h), dtype)

    def forward(self, x):
        if hasattr(self, "gate_up_proj"):
            return self.down_proj(silu_and_mul(self.gate_up_proj(x)))
        return self.down_proj(silu_and_mul(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, idx: int, method_for: MethodFor, dtype, fused: bool):
        super().__init__()
        prefix = f"model.layers.{idx}"
        self.idx = idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, f"{prefix}.self_attn", method_for, dtype, fused)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, f"{prefix}.mlp", method_for, dtype, fused)

    def shard(self, rank: int, world: int) -> None:
        """Keeps rank `rank`'s heads and hidden units of this layer (LlamaModel.shard)."""
        shard_linears(self, rank, world)
        self.self_attn.n_heads //= world
        self.self_attn.n_kv //= world

    def forward(self, x, cos, sin, cache=None):
        """x -> the residual stream after this layer."""
        h, residual = self.step(x, None, cos, sin, cache)
        return residual + h

    def step(self, h, residual, cos, sin, cache=None):
        """The residual stream kept as two terms, h + residual (vLLM's layout), so that every add
        runs inside the RMSNorm kernel after it: -> (this layer's MLP output, the residual)."""
        if residual is None:
            h, residual = self.input_layernorm(h), h
        else:
            h, residual = self.input_layernorm(h, residual)  # (norm(h + residual), h + residual)
        h = self.self_attn(h, cos, sin, cache, self.idx)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, method_for: MethodFor, dtype, fused: bool):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, method_for, dtype, fused) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


class LlamaModel(nn.Module):
    """Parameter names equal the HF Llama names, so a checkpoint loads by name; with `fused` (what
    inference runs) q/k/v and gate/up are one merged QLinear each (qkv_proj, gate_up_proj) that the
    loader fills from the checkpoint's separate tensors. Quantizers build it unfused: they work on
    each projection under its own name."""

    def __init__(self, cfg: ModelConfig, method_for: MethodFor = _dense, dtype: torch.dtype = torch.float32,
                 fused: bool = True):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg, method_for, dtype, fused)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
        # the output head stays dense: it is 1-2% of a 7B model's bytes and sensitive to error.
        self.lm_head = None if cfg.tie_word_embeddings else QLinear(cfg.hidden_size, cfg.vocab_size, False, None, dtype)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    @staticmethod
    def check_shardable(cfg: ModelConfig, world: int) -> None:
        """Refuses a split the heads or the vocabulary do not divide into (before any work)."""
        if cfg.num_key_value_heads % world or cfg.num_attention_heads % world:
            raise LowbitError(f"tensor parallelism over {world} ranks needs the {cfg.num_attention_heads} attention "
                              f"heads and {cfg.num_key_value_heads} KV heads to divide by {world}")
        if not cfg.tie_word_embeddings and cfg.vocab_size % world:
            raise LowbitError(f"tensor parallelism over {world} ranks: vocabulary {cfg.vocab_size} does not divide")

    def shard(self, rank: int, world: int) -> None:
        """Keeps rank `rank`'s part of every layer (TP_PLAN) for tensor parallelism over `world`
        ranks; embeddings and norms stay whole on every rank."""
        if getattr(self, "tp_shard", None) == (rank, world):  # already this rank's (a reused model)
            return
        if getattr(self, "tp_shard", None) is not None:
            raise LowbitError(f"this model is rank {self.tp_shard[0]} of {self.tp_shard[1]}'s shard; load it again "
                              f"to split it over {world}")
        self.check_shardable(self.config, world)
        for layer in self.layers:
            layer.shard(rank, world)
        if self.lm_head is not None:
            self.lm_head.shard(TP_PLAN["lm_head"], rank, world)
        self._mark_shard(rank, world)

    def _mark_shard(self, rank: int, world: int) -> None:
        cfg = self.config
        self.config = dataclasses.replace(cfg, num_attention_heads=cfg.num_attention_heads // world,
                                          num_key_value_heads=cfg.num_key_value_heads // world)
        self.tp_shard = (rank, world)

    @classmethod
    def build_shard(cls, cfg: ModelConfig, method_for: MethodFor, dtype, fused: bool, device, rank: int, world: int,
                    fill: Callable[[nn.Module, str], None]) -> "LlamaModel":
        """Rank `rank`'s shard of the model, built one layer at a time: each decoder layer is made
        whole on `device`, filled by `fill(module, prefix)` (its tensors are the checkpoint's
        prefix + name) and cut to this rank's part before the next is made, so a rank holds its
        shard plus one whole layer, never the whole model (70B in fp16 fits no single GPU). The
        same as building the whole model, filling it and calling `shard` (tests/test_tensor_parallel.py)."""
        cls.check_shardable(cfg, world)
        with torch.device(device):
            model = cls(dataclasses.replace(cfg, num_hidden_layers=0), method_for, dtype, fused)
        model.config = cfg
        fill(model, "")  # embeddings, the final norm, the output head (kept whole, then split)
        if model.lm_head is not None:
            model.lm_head.shard(TP_PLAN["lm_head"], rank, world)
        for i in range(cfg.num_hidden_layers):
            with torch.device(device):
                layer = DecoderLayer(cfg, i, method_for, dtype, fused)
            fill(layer, f"model.layers.{i}.")
            layer.shard(rank, world)
            model.model.layers.append(layer)
        model._mark_shard(rank, world)
        return model.eval()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        return self.rotary.cos_sin(positions, dtype)

    def head(self, h: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The final norm (of h + residual when given) and the output projection."""
        h = self.model.norm(h) if residual is None else self.model.norm(h, residual)[0]
        if self.lm_head is None:
            return dense_linear(h, self.model.embed_tokens.weight)
        return self.lm_head(h)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache=None,
                last_only: bool = False) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab] (fp32), or [B, 1, vocab] with last_only."""
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
            positions = positions.expand(input_ids.shape[0], -1)
        h, residual = self.embed(input_ids), None
        cos, sin = self.rope(positions, h.dtype)
        for layer in self.model.layers:
            h, residual = layer.step(h, residual, cos, sin, cache)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        if last_only:
            h, residual = h[:, -1:], residual[:, -1:]
        return self.head(h, residual).float()
