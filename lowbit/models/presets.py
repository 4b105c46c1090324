"""Named model shapes for dummy-weight benchmarks (gpt-fast's `transformer_configs`); the weights
of those shapes are made by `lowbit/loading/dummy.py`. Speed and memory depend on the shapes, not
on the values.
"""
from __future__ import annotations

from lowbit.config import ModelConfig
from lowbit.errors import LowbitError

# HF config.json values of the released models (num_key_value_heads < heads: grouped-query attention).
PRESETS: dict[str, dict] = {
    # CPU tests: every dimension a multiple of 128, so W4A16 g128 applies as on the real shapes
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048),
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, head_dim=128, max_position_embeddings=4096),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192,
                      rope_theta=500000.0),
    "llama2-70b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096),
}


def preset_config(arch: str) -> ModelConfig:
    if arch not in PRESETS:
        raise LowbitError(f"--arch {arch!r}: expected one of {', '.join(PRESETS)}")
    return ModelConfig(**{"rms_norm_eps": 1e-5, **PRESETS[arch]}, architecture="LlamaForCausalLM")
