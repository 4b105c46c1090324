"""Turns a scheduled batch into tensors, runs the model over the paged cache, and samples. Makes
no scheduling decisions: it computes what the scheduler chose and reports the sampled tokens.

The batch is packed into one sequence of tokens (B=1), decode tokens first. Decode-side inputs
have one row per sequence and fixed widths (block tables span max_model_len), so a decode-only
step has the same tensor shapes for the same batch size: what CUDA graph capture needs.
"""
from __future__ import annotations

import torch

from lowbit.engine.config import CPU_KV_CACHE_BYTES, EngineConfig
from lowbit.engine.sampler import SamplingBatch, sample
from lowbit.engine.scheduler import ScheduledBatch
from lowbit.engine.sequence import Sequence
from lowbit.errors import LowbitError
from lowbit.layers.paged_kv_cache import PagedAttentionMetadata, PagedKVCache


class ModelRunner:
    def __init__(self, model, config: EngineConfig):
        cfg = model.config
        self.model = model
        self.config = config
        self.device = model.model.embed_tokens.weight.device
        self.dtype = model.model.embed_tokens.weight.dtype
        self.block_size = config.block_size
        self.vocab_size = cfg.vocab_size
        self.max_blocks_per_seq = -(-config.max_model_len // config.block_size)
        self.num_blocks = config.num_kv_blocks or self._blocks_that_fit()
        if self.num_blocks < self.max_blocks_per_seq:
            raise LowbitError(
                f"the KV cache holds {self.num_blocks} blocks of {self.block_size} tokens, less than one "
                f"sequence of max_model_len={config.max_model_len}; lower max_model_len, raise num_kv_blocks or "
                f"gpu_memory_utilization, or use kv_bits=8/4")
        self.cache = PagedKVCache(cfg.num_hidden_layers, self.num_blocks, self.block_size, cfg.num_key_value_heads,
                                  cfg.head_dim, config.kv_bits, self.dtype, self.device)
        self.generators: dict[int, torch.Generator] = {}  # seq_id -> its seeded generator

    def _blocks_that_fit(self) -> int:
        cfg, config = self.model.config, self.config
        block_bytes = self.block_size * PagedKVCache.bytes_per_token(
            cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, config.kv_bits, self.dtype)
        if self.device.type != "cuda":
            return max(CPU_KV_CACHE_BYTES // block_bytes, self.max_blocks_per_seq)
        return max(0, self._cuda_kv_bytes()) // block_bytes

    @torch.inference_mode()
    def _cuda_kv_bytes(self) -> int:
        """What gpu_memory_utilization leaves for the cache after the weights (and anything else on
        the device) and the activations of the largest step, measured by running one."""
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        t = self.config.max_num_batched_tokens
        ids = torch.zeros(t, dtype=torch.int64, device=self.device)
        self._forward(ids, torch.arange(t, device=self.device), None, list(range(min(t, self.config.max_batch_size))))
        torch.cuda.synchronize()
        activations = torch.cuda.max_memory_allocated() - before
        torch.cuda.empty_cache()
        return int(total * self.config.gpu_memory_utilization) - (total - free) - activations

    def _forward(self, input_ids, positions, cache, sample_rows: list[int]) -> torch.Tensor:
        """The packed tokens [T] through the model -> fp32 logits [len(sample_rows), vocab]; the
        output head runs only on the rows that sample (a prompt chunk needs no logits)."""
        model = self.model
        h = model.embed(input_ids[None])
        cos, sin = model.rope(positions[None], h.dtype)
        for layer in model.layers:
            h = layer(h, cos, sin, cache)
        return model.head(h[0, sample_rows]).float()

    def release(self, seq: Sequence) -> None:
        self.generators.pop(seq.seq_id, None)

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.seed is None:
            return None
        if seq.seq_id not in self.generators:
            self.generators[seq.seq_id] = torch.Generator(device=self.device).manual_seed(seq.params.seed)
        return self.generators[seq.seq_id]

    def prepare(self, seqs: list[Sequence], num_new: list[int]):
        """-> input_ids [T], positions [T], metadata, and the rows (into the packed tokens) of each
        sequence's last token where that token completes the sequence, so a new token is sampled."""
        bs = self.block_size
        ids, positions, slots, sample_rows = [], [], [], []
        tables = torch.zeros(len(seqs), self.max_blocks_per_seq, dtype=torch.int32)
        for i, (seq, n) in enumerate(zip(seqs, num_new)):
            start = seq.num_computed_tokens
            ids += seq.token_ids[start:start + n]
            positions += range(start, start + n)
            slots += [seq.block_table[p // bs] * bs + p % bs for p in range(start, start + n)]
            tables[i, :len(seq.block_table)] = torch.tensor(seq.block_table, dtype=torch.int32)
            if start + n == seq.num_tokens:
                sample_rows.append(len(ids) - 1)
        context = [s.num_computed_tokens + n for s, n in zip(seqs, num_new)]

        def dev(x, dtype=torch.int64):
            return torch.as_tensor(x, dtype=dtype).to(self.device, non_blocking=True)

        meta = PagedAttentionMetadata(
            slot_mapping=dev(slots), block_tables=dev(tables, torch.int32), context_lens=dev(context, torch.int32),
            num_decode=sum(1 for n in num_new if n == 1),  # they come first
            query_lens=list(num_new), context_lens_host=context)
        return dev(ids), dev(positions), meta, sample_rows

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[list[int | None], list]:
        """-> per sequence of the batch (in its order): the sampled token or None (prompt not yet
        fully read), and its logprobs entry or None."""
        # decodes first, so the cache takes them as one group; stable, so the rest keep their order
        order = sorted(range(len(batch)), key=lambda i: batch.num_new_tokens[i] != 1)
        seqs = [batch.seqs[i] for i in order]
        num_new = [batch.num_new_tokens[i] for i in order]
        input_ids, positions, meta, sample_rows = self.prepare(seqs, num_new)
        self.cache.set_metadata(meta)
        logits = self._forward(input_ids, positions, self.cache, sample_rows)
        sampling = [s for s, n in zip(seqs, num_new) if s.num_computed_tokens + n == s.num_tokens]
        tokens, logprobs = [None] * len(batch), [None] * len(batch)
        if sampling:
            sb = SamplingBatch.build(sampling, [self._generator(s) for s in sampling], self.vocab_size, self.device)
            new, lps = sample(logits, sb)
            by_seq = dict(zip((s.seq_id for s in sampling), zip(new.tolist(), lps or [None] * len(sampling))))
            for i, seq in enumerate(batch.seqs):
                if seq.seq_id in by_seq:
                    tokens[i], logprobs[i] = by_seq[seq.seq_id]
        return tokens, logprobs
