"""InternLM2 checkpoints under Llama names: `wqkv` split per KV group, the other tensors renamed."""
from __future__ import annotations

import re

import torch

from lowbit.loading.checkpoint import Checkpoint

_RENAMES = {
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}


class InternLM2Names(Checkpoint):
    """Wraps a checkpoint with InternLM2 names and answers in Llama names."""

    def __init__(self, inner: Checkpoint):
        self.inner = inner
        self.config = inner.config
        self.quant = inner.quant
        self.source = inner.source

    def names(self):
        return self.inner.names()

    def has(self, name):
        return self.inner.has(self._source_name(name)[0])

    def _source_name(self, name: str) -> tuple[str, str | None]:
        if name == "model.embed_tokens.weight":
            return "model.tok_embeddings.weight", None
        if name == "lm_head.weight":
            return "output.weight", None
        m = re.fullmatch(r"(model\.layers\.\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", name)
        if m:
            return f"{m.group(1)}.attention.wqkv.{m.group(3)}", m.group(2)
        for ours, theirs in _RENAMES.items():
            if f".{ours}." in name:
                return name.replace(f".{ours}.", f".{theirs}."), None
        return name, None

    def get(self, name: str) -> torch.Tensor:
        src, part = self._source_name(name)
        t = self.inner.get(src)
        if part is None:
            return t
        # wqkv rows: for each KV head, its q_per_kv query heads, then its key, then its value
        c = self.config
        q_per_kv = c.num_attention_heads // c.num_key_value_heads
        g = t.reshape(c.num_key_value_heads, q_per_kv + 2, c.head_dim, *t.shape[1:])
        sel = {"q": g[:, :q_per_kv], "k": g[:, q_per_kv], "v": g[:, q_per_kv + 1]}[part]
        return sel.reshape(-1, *t.shape[1:]).contiguous()

    def tokenizer(self):
        return self.inner.tokenizer()

    def generation_config(self):
        return self.inner.generation_config()
