"""GGUF files (llama.cpp) with the `llama` architecture: metadata -> ModelConfig, tensors
dequantized by the `gguf` package and renamed to HF Llama names, tokenizer from metadata."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from lowbit.config import ModelConfig
from lowbit.errors import LowbitError
from lowbit.loading.checkpoint import Checkpoint

# Tensor types we dequantize; anything else gets a clear error naming the tensor.
SUPPORTED_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"}

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None  # e.g. rope_freqs.weight: not a parameter of ours


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter interleaves each head's two rotary halves (its `permute` in
    convert_hf_to_gguf.py); this restores HF's rotate-half row order."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _reader(path: Path):
    """gguf's GGUFReader, reading its metadata through a plain ndarray view of the same memory map.

    The reader slices its np.memmap once per value: 250,000 slices for the default model's
    tokenizer, each paying numpy's memmap subclass bookkeeping, 3.3 s of every process that opens
    the file (the quickstart's commands, most tests). Slices of a plain view of the same mapping are
    the same bytes, still read on demand, at a quarter of the cost (0.9 s)."""
    from gguf import GGUFReader

    class Reader(GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self._plain = self.data.view(np.ndarray)
            arr = plain[offset:offset + np.dtype(dtype).itemsize * int(count)].view(dtype)
            order = self.byte_order if override_order is None else override_order
            return arr.view(arr.dtype.newbyteorder(order))

    return Reader(str(path), "r")


class GGUFFile(Checkpoint):
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.source = str(self.path)
        if not self.path.is_file():
            raise LowbitError(f"{self.path}: not found")
        try:
            self.reader = _reader(self.path)  # memory-mapped; tensors read on demand
        except Exception as e:
            raise LowbitError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e}); "
                              f"it may be truncated or corrupt") from None
        self.meta = {k: f for k, f in self.reader.fields.items()}
        arch = self._field("general.architecture")
        if arch != "llama":
            raise LowbitError(f"{self.path}: GGUF architecture {arch!r} is not supported; lowbit reads 'llama'")
        self._tensors = {}
        for t in self.reader.tensors:
            name = hf_name(t.name)
            if name is not None:
                self._tensors[name] = t
        self.config = self._config()
        self.quant = None

    def _field(self, key: str, default=None):
        f = self.meta.get(key)
        if f is None:
            return default
        return f.contents()

    def _config(self) -> ModelConfig:
        a = "llama"
        heads = int(self._field(f"{a}.attention.head_count"))
        hidden = int(self._field(f"{a}.embedding_length"))
        tokens = self._field("tokenizer.ggml.tokens") or []
        vocab = int(self._field(f"{a}.vocab_size", len(tokens)))
        scaling = None
        kind = self._field(f"{a}.rope.scaling.type")
        if kind == "linear":
            scaling = {"rope_type": "linear", "factor": float(self._field(f"{a}.rope.scaling.factor"))}
        eos = self._field("tokenizer.ggml.eos_token_id")
        hf = {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": int(self._field(f"{a}.feed_forward_length")),
            "num_hidden_layers": int(self._field(f"{a}.block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self._field(f"{a}.attention.head_count_kv", heads)),
            "head_dim": int(self._field(f"{a}.rope.dimension_count", hidden // heads)),
            "max_position_embeddings": int(self._field(f"{a}.context_length", 4096)),
            "rms_norm_eps": float(self._field(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": float(self._field(f"{a}.rope.freq_base", 10000.0)),
            "rope_scaling": scaling,
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "bos_token_id": self._field("tokenizer.ggml.bos_token_id"),
            "eos_token_id": eos,
            "attention_bias": "model.layers.0.self_attn.q_proj.bias" in self._tensors,
        }
        return ModelConfig.from_hf(hf, source=str(self.path))

    def names(self):
        return self._tensors.keys()

    def has(self, name):
        return name in self._tensors

    def get(self, name: str) -> torch.Tensor:
        from gguf import GGMLQuantizationType, dequantize

        t = self._tensors.get(name)
        if t is None:
            raise LowbitError(f"{self.path}: tensor {name!r} missing from the GGUF file")
        kind = t.tensor_type.name
        if kind not in SUPPORTED_TYPES:
            raise LowbitError(f"{self.path}: tensor {t.name} has type {kind}; lowbit dequantizes "
                              f"{', '.join(sorted(SUPPORTED_TYPES))}")
        try:
            if t.tensor_type == GGMLQuantizationType.BF16:
                raw = np.asarray(t.data).view(np.uint16).astype(np.uint32) << 16
                arr = raw.view(np.float32)
            else:
                arr = dequantize(t.data, t.tensor_type)
            shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dims fastest-first
            arr = np.asarray(arr, dtype=np.float32).reshape(shape)
        except LowbitError:
            raise
        except Exception as e:
            raise LowbitError(f"{self.path}: tensor {t.name} could not be read ({e}); the file may be truncated") from None
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            arr = unpermute_qk(arr, self.config.num_attention_heads)
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            arr = unpermute_qk(arr, self.config.num_key_value_heads)
        if not arr.flags.writeable or not arr.flags.c_contiguous:  # memory-mapped F32 tensors are read-only
            arr = np.array(arr, order="C")
        return torch.from_numpy(arr)

    def tokenizer(self):
        from lowbit.loading.gguf_tokenizer import tokenizer_from_gguf

        return tokenizer_from_gguf(self)

    def generation_config(self) -> dict:
        return {"bos_token_id": self.config.bos_token_id, "eos_token_id": self.config.eos_token_id}
