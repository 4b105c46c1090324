"""Our runtime on the real default model against transformers' implementation of the same weights."""
import torch

from lowbit.engine.llm import LLM
from lowbit.engine.sampling_params import SamplingParams

CHAT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]


def test_logits_match_transformers(smol, hf_smol):
    model, tok, _ = smol
    ids = torch.tensor([tok.encode_chat(CHAT)])
    with torch.no_grad():
        ours = model(ids)
        theirs = hf_smol(ids).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-3


def test_chat_template_matches_transformers_tokenizer(smol, gguf_path):
    from transformers import AutoTokenizer

    _, tok, _ = smol
    hf_tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    expect = hf_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    expect = expect["input_ids"] if isinstance(expect, dict) or hasattr(expect, "keys") else expect
    assert tok.encode_chat(CHAT) == list(expect)
    text = "Numbers 12345 and naïve café, ünïcode!\n\tTabs  and   spaces."
    assert tok.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"]


def test_32_greedy_tokens_match_transformers(smol, hf_smol):
    """The engine (paged KV cache, its sampler) against transformers' generate."""
    _, tok, _ = smol
    prompt = tok.encode_chat(CHAT)
    llm = LLM(smol, max_batch_size=1, max_model_len=len(prompt) + 32, num_kv_blocks=8)
    ours = llm.generate(prompt, SamplingParams(max_tokens=32))[0].token_ids
    with torch.no_grad():
        out = hf_smol.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                               attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    theirs = out[0, len(prompt):].tolist()
    assert len(ours) == 32
    assert ours == theirs


def test_kv_cache_decode_equals_full_forward(smol):
    """Token-by-token decoding through the cache gives the logits of one full pass."""
    from lowbit.layers.kv_cache import ContiguousKVCache

    model, tok, _ = smol
    cfg = model.config
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog because")])
    cache = ContiguousKVCache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, ids.shape[1], cfg.head_dim,
                              torch.float32)
    with torch.no_grad():
        full = model(ids)
        first = model(ids[:, :5], cache=cache)
        steps = [model(ids[:, i:i + 1], cache=cache) for i in range(5, ids.shape[1])]
    stepped = torch.cat([first] + steps, dim=1)
    assert (stepped - full).abs().max().item() < 1e-4


def test_our_gguf_reader_reads_what_ggufs_own_reader_reads(gguf_path):
    """loading/gguf_file.py reads metadata through a plain view of gguf's memory map (for speed):
    every field's parts and every tensor's bytes are those of gguf's own GGUFReader."""
    import numpy as np
    from gguf import GGUFReader

    from lowbit.loading.gguf_file import _reader

    theirs, ours = GGUFReader(str(gguf_path), "r"), _reader(gguf_path)
    assert ours.fields.keys() == theirs.fields.keys()
    for key, field in theirs.fields.items():
        mine = ours.fields[key]
        assert mine.types == field.types and mine.data == field.data, key
        assert len(mine.parts) == len(field.parts), key
        assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(mine.parts, field.parts)), key
    assert [(t.name, t.tensor_type, t.data_offset) for t in ours.tensors] == \
        [(t.name, t.tensor_type, t.data_offset) for t in theirs.tensors]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(ours.tensors, theirs.tensors))


def test_cpu_rmsnorm_is_the_explicit_fp32_formula_bit_for_bit():
    """layers/norm.py runs fp32 RMSNorm on the CPU as PyTorch's fused op: the same bits as the
    explicit formula (HF's), with and without the residual add, at the default model's widths."""
    from lowbit.layers.norm import RMSNorm

    g = torch.Generator().manual_seed(0)
    for dim in (576, 1536, 4096):
        norm = RMSNorm(dim, 1e-5)
        norm.weight.copy_(torch.randn(dim, generator=g))
        for rows in (1, 9):
            x = torch.randn(1, rows, dim, generator=g) * 7
            r = torch.randn(1, rows, dim, generator=g)
            explicit = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
            assert torch.equal(norm(x), explicit)
            y, h = norm(x, r)
            s = x + r
            assert torch.equal(h, s)
            assert torch.equal(y, norm.weight * (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5)))
