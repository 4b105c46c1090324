"""Model and quantization configuration as plain dataclasses.

`ModelConfig.from_hf` reads a checkpoint's own config.json; nothing here is global or mutable
after construction.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError

# HF `architectures` entries our one decoder covers, and the family name we store.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "InternLM2ForCausalLM": "internlm2",
}


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    # q/k/v bias (Qwen2, Llama `attention_bias`) and o_proj bias (Llama `attention_bias` only).
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    family: str = "llama"
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    torch_dtype: str = "float16"

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        archs = hf.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise LowbitError(
                f"{source}: unsupported architecture {archs or hf.get('model_type')!r}; "
                f"lowbit runs {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        family = SUPPORTED_ARCHITECTURES[arch]
        try:
            hidden = int(hf["hidden_size"])
            heads = int(hf["num_attention_heads"])
            cfg = cls(
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_hidden_layers=int(hf["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(hf.get("head_dim") or hidden // heads),
                max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=float(_rope_theta(hf)),
                rope_scaling=_rope_scaling(hf),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                qkv_bias=family == "qwen2" or bool(hf.get("attention_bias", False) or hf.get("bias", False)),
                o_bias=family != "qwen2" and bool(hf.get("attention_bias", False) or hf.get("bias", False)),
                mlp_bias=bool(hf.get("mlp_bias", False)),
                sliding_window=_sliding_window(hf, family),
                family=family,
                architecture=arch,
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=hf.get("eos_token_id"),
                torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float16"),
            )
        except KeyError as e:
            raise LowbitError(f"{source}: missing required key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise LowbitError(f"{source}: malformed value ({e})") from None
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise LowbitError(
                f"{source}: num_attention_heads {cfg.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {cfg.num_key_value_heads}"
            )
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            hf = json.loads(path.read_text())
        except FileNotFoundError:
            raise LowbitError(f"{path}: not found") from None
        except json.JSONDecodeError as e:
            raise LowbitError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf(hf, source=str(path))

    def to_hf(self) -> dict[str, Any]:
        """A config.json that transformers' own class for this architecture accepts."""
        hf: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": self.torch_dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        if self.family in ("llama", "internlm2"):
            hf["attention_bias"] = self.qkv_bias
            hf["mlp_bias"] = self.mlp_bias
        if self.family == "mistral":
            hf["sliding_window"] = self.sliding_window
        return hf

    @property
    def num_parameters(self) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (self.num_attention_heads * 2 + self.num_key_value_heads * 2)
        per_layer = attn + 3 * h * i + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + emb + h


def _rope_theta(hf: dict) -> float:
    # transformers 5 may nest rope settings under `rope_parameters`.
    params = hf.get("rope_parameters") or {}
    return hf.get("rope_theta") or params.get("rope_theta") or 10000.0


def _rope_scaling(hf: dict) -> dict | None:
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
    if not scaling:
        return None
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind in (None, "default"):
        return None
    if kind not in ("linear", "dynamic", "llama3"):
        raise LowbitError(f"config.json: rope_scaling type {kind!r} is not supported (linear, dynamic, llama3)")
    out = {k: v for k, v in scaling.items() if k != "type" and k != "rope_theta"}
    out["rope_type"] = kind
    return out


def _sliding_window(hf: dict, family: str) -> int | None:
    if family != "mistral" and not hf.get("use_sliding_window"):
        return None
    sw = hf.get("sliding_window")
    return int(sw) if sw else None


@dataclass
class QuantConfig:
    """How a checkpoint's linear weights are stored (`quantization_config` in config.json)."""

    method: str = "dense"  # dense | awq | gptq | ...
    bits: int = 16
    group_size: int = -1
    zero_point: bool = True
    desc_act: bool = False
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)
