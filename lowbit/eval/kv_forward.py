"""A window of tokens through the model with its keys and values stored in, and read back from,
the engine's paged KV cache at `kv_bits` (16, 8 or 4): what `--kv-bits` on `eval ppl` and
`eval kld` measures. The cache's prefill attention reads every key and value back from the cache
after writing it, so each query attends to quantized keys and values, as a decode step does."""
from __future__ import annotations

import torch

from lowbit.layers.paged_kv_cache import PagedAttentionMetadata, PagedKVCache

BLOCK_SIZE = 16


def kv_cache_logits(model, ids_1xt: torch.Tensor, kv_bits: int) -> torch.Tensor:
    """ids [1, T] -> fp32 logits [1, T, vocab], attention through a fresh paged cache of kv_bits."""
    cfg = model.config
    dev = ids_1xt.device
    t = ids_1xt.shape[1]
    blocks = -(-t // BLOCK_SIZE)
    dtype = model.model.embed_tokens.weight.dtype
    cache = PagedKVCache(cfg.num_hidden_layers, blocks, BLOCK_SIZE, cfg.num_key_value_heads, cfg.head_dim, kv_bits,
                         dtype, dev)
    cache.set_metadata(PagedAttentionMetadata(
        slot_mapping=torch.arange(t, device=dev), block_tables=torch.arange(blocks, dtype=torch.int32, device=dev)[None],
        context_lens=torch.tensor([t], dtype=torch.int32, device=dev), num_decode=0, query_lens=[t],
        context_lens_host=[t],
        prefill_cu_seqlens_q=torch.tensor([0, t], dtype=torch.int32, device=dev) if cache.kernels.prefill else None))
    return model(ids_1xt, positions=torch.arange(t, device=dev)[None], cache=cache)
