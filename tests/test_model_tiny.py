"""Tiny random Llama-family configs: our decoder against transformers' implementation, fp32."""
import json

import pytest
import torch
from safetensors.torch import save_file

from lowbit.loading.loader import load_model

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-5)


def _hf_model(kind: str, **extra):
    import transformers as tf

    cfg_cls, model_cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
    }[kind]
    torch.manual_seed(0)
    cfg = cfg_cls(**{**TINY, **extra})
    cfg._attn_implementation = "eager"
    model = model_cls(cfg).eval()
    with torch.no_grad():  # HF inits biases and norms to constants; randomize so they are tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _compare(hf, tmp_path, seq=24):
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours, _, _ = _load(tmp_path)
    ids = torch.randint(0, TINY["vocab_size"], (2, seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    assert diff < 1e-4, diff


def _load(path):
    # our loader needs a tokenizer only when asked; build the model alone here
    from lowbit.loading.loader import build_model, open_checkpoint

    ckpt = open_checkpoint(path)
    return build_model(ckpt, torch.float32, "cpu"), None, ckpt


@pytest.mark.parametrize("extra", [
    {},
    {"tie_word_embeddings": True},
    {"attention_bias": True, "mlp_bias": True},
    {"head_dim": 32},
    {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16}, "rope_theta": 500000.0},
], ids=["llama2", "tied", "bias", "head_dim", "rope-linear", "rope-dynamic", "llama3"])
def test_llama_variants(tmp_path, extra):
    # dynamic NTK only changes anything past max_position_embeddings: run 40 > 32 tokens
    _compare(_hf_model("llama", **extra), tmp_path, seq=40 if "dynamic" in str(extra) else 24)


def test_mistral_sliding_window(tmp_path):
    _compare(_hf_model("mistral", sliding_window=8), tmp_path, seq=24)


def test_qwen2_qkv_bias(tmp_path):
    hf = _hf_model("qwen2")
    assert hf.model.layers[0].self_attn.q_proj.bias is not None
    _compare(hf, tmp_path)


def test_internlm2_fused_wqkv(tmp_path):
    """InternLM2 names and fused wqkv, built from a Llama model's weights; must give its logits."""
    hf = _hf_model("llama")
    c = hf.config
    head_dim, kvh, qpk = c.hidden_size // c.num_attention_heads, c.num_key_value_heads, c.num_attention_heads // c.num_key_value_heads
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    out = {"model.tok_embeddings.weight": sd.pop("model.embed_tokens.weight"), "output.weight": sd.pop("lm_head.weight"),
           "model.norm.weight": sd.pop("model.norm.weight")}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}"
        q = sd[f"{p}.self_attn.q_proj.weight"].view(kvh, qpk, head_dim, -1)
        k = sd[f"{p}.self_attn.k_proj.weight"].view(kvh, 1, head_dim, -1)
        v = sd[f"{p}.self_attn.v_proj.weight"].view(kvh, 1, head_dim, -1)
        out[f"{p}.attention.wqkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, c.hidden_size).contiguous()
        out[f"{p}.attention.wo.weight"] = sd[f"{p}.self_attn.o_proj.weight"]
        out[f"{p}.feed_forward.w1.weight"] = sd[f"{p}.mlp.gate_proj.weight"]
        out[f"{p}.feed_forward.w3.weight"] = sd[f"{p}.mlp.up_proj.weight"]
        out[f"{p}.feed_forward.w2.weight"] = sd[f"{p}.mlp.down_proj.weight"]
        out[f"{p}.attention_norm.weight"] = sd[f"{p}.input_layernorm.weight"]
        out[f"{p}.ffn_norm.weight"] = sd[f"{p}.post_attention_layernorm.weight"]
    save_file(out, str(tmp_path / "model.safetensors"))
    cfg = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": False,
           "rope_theta": c.rope_parameters["rope_theta"] if getattr(c, "rope_parameters", None) else 10000.0,
           "rope_scaling": None, **TINY}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours, _, _ = _load(tmp_path)
    ids = torch.randint(0, TINY["vocab_size"], (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() < 1e-4
