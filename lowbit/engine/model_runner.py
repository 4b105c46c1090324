"""Turns a scheduled batch into tensors, runs the model over the paged cache, and samples. Makes
no scheduling decisions: it computes what the scheduler chose and reports the sampled tokens.

The batch is packed into one sequence of tokens (B=1), decode tokens first. Decode-side inputs
have one row per sequence and fixed widths (block tables span max_model_len), so a decode-only
step has the same tensor shapes for the same batch size: on a GPU it replays a CUDA graph
(`cuda_graphs.py`); prompt chunks always run eagerly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Callable, Iterator

import torch

from lowbit.engine.config import CPU_KV_CACHE_BYTES, EngineConfig
from lowbit.engine.cuda_graphs import DecodeGraphs, StepInputs
from lowbit.engine.sampler import SamplingBatch, sample
from lowbit.engine.structured_output import allowed_tokens_bitmask, apply_bitmask
from lowbit.engine.scheduler import ScheduledBatch
from lowbit.engine.sequence import Sequence
from lowbit.errors import LowbitError
from lowbit.layers.cpu_weights import decode_step
from lowbit.layers.paged_kv_cache import PagedAttentionMetadata, PagedKVCache
from lowbit.parallel import comm

log = logging.getLogger(__name__)


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
        # tensor-parallel ranks hold the same blocks (one block manager, on rank 0): the fewest any fits
        self.num_blocks = comm.min_over_ranks(config.num_kv_blocks or self._blocks_that_fit())
        if self.num_blocks < self.max_blocks_per_seq:
            raise LowbitError(
                f"the KV cache holds {self.num_blocks} blocks of {self.block_size} tokens, less than one "
                f"sequence of max_model_len={config.max_model_len}; lower max_model_len, raise num_kv_blocks or "
                f"gpu_memory_utilization, or use kv_bits=8/4")
        # one block more than the block manager hands out: the scratch block graph padding writes to
        self.scratch_block = self.num_blocks
        self.cache = PagedKVCache(cfg.num_hidden_layers, self.num_blocks + 1, self.block_size,
                                  cfg.num_key_value_heads, cfg.head_dim, config.kv_bits, self.dtype, self.device)
        self.generators: dict[int, torch.Generator] = {}  # seq_id -> its seeded generator
        # tensor parallelism: turns a failed collective into the error of the rank that caused it
        self.explain_failure: Callable[[BaseException], Exception] | None = None
        self.graphs: DecodeGraphs | None = None
        self.graph_status = "off: CPU" if self.device.type != "cuda" else "off: enforce_eager"
        if self.device.type == "cuda" and not config.enforce_eager:
            self._capture_graphs()

    def _blocks_that_fit(self) -> int:
        cfg, config = self.model.config, self.config
        block_bytes = self.block_size * PagedKVCache.bytes_per_token(
            cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, config.kv_bits, self.dtype)
        if self.device.type != "cuda":
            return max(CPU_KV_CACHE_BYTES // block_bytes, self.max_blocks_per_seq)
        return max(0, self._cuda_kv_bytes() // block_bytes - 1)  # - 1: the scratch block

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

    def _capture_graphs(self, graphs_cls=DecodeGraphs) -> None:
        why_not = None
        if not self.cache.decode_is_graph_safe:
            why_not = "no paged decode kernel (lowbit.kernels.paged_attention), the PyTorch path has host-side shapes"
        elif self.model.rotary.kind == "dynamic":
            why_not = "dynamic rope scaling reads the positions on the host"
        elif comm.world() > 1 and os.environ.get("LOWBIT_TP_CUDA_GRAPHS", "1") == "0":
            why_not = "tensor parallelism with LOWBIT_TP_CUDA_GRAPHS=0"
        if why_not:
            self.graph_status = f"off: {why_not}"
            log.warning("CUDA graphs off (%s); decoding eagerly", why_not)
            return
        graphs = graphs_cls(lambda ids, pos: self._forward(ids, pos, self.cache, None), self.cache,
                              self.config.max_batch_size, self.max_blocks_per_seq, self.scratch_block, self.device)
        failure = None
        try:
            graphs.capture()
        except Exception as e:  # a kernel that cannot be captured: slower, still correct
            failure = f"capture failed ({type(e).__name__}: {e})"
        captured_everywhere = comm.min_over_ranks(int(failure is None))  # every rank decodes the same way
        if failure is None and not captured_everywhere:
            failure = "another tensor-parallel rank failed to capture"
        if failure is not None:
            self.graph_status = f"off: {failure}"
            log.warning("CUDA graphs off: %s; decoding eagerly", failure)
            del graphs
            if self.device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            return
        self.graphs = graphs
        self.graph_status = f"captured for batch sizes {graphs.sizes}"

    def _forward(self, input_ids, positions, cache, sample_rows: list[int] | None) -> torch.Tensor:
        """The packed tokens [T] through the model -> fp32 logits [len(sample_rows), vocab]; the
        output head runs only on the rows that sample (a prompt chunk needs no logits); None: all."""
        model = self.model
        h, residual = model.embed(input_ids[None]), None
        cos, sin = model.rope(positions[None], h.dtype)
        for layer in model.layers:
            h, residual = layer.step(h, residual, cos, sin, cache)
        rows = slice(None) if sample_rows is None else sample_rows
        return model.head(h[0, rows], residual[0, rows]).float()

    def release(self, seq: Sequence) -> None:
        self.generators.pop(seq.seq_id, None)

    def release_graphs(self) -> None:
        """Destroys the captured decode graphs. Under tensor parallelism this must come before the
        process group is destroyed: NCCL counts each graph that captured one of its collectives and
        ncclCommDestroy/Abort wait until every such graph is gone, so a live graph hangs it forever."""
        if self.graphs is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # no replay in flight
        self.graphs.graphs.clear()  # the replay closures hold the torch.cuda.CUDAGraph objects
        self.graphs = None
        self.graph_status = "off: released"

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.seed is None:
            return None
        if seq.seq_id not in self.generators:
            self.generators[seq.seq_id] = torch.Generator(device=self.device).manual_seed(seq.params.seed)
        return self.generators[seq.seq_id]

    def prepare(self, seqs: list[Sequence], num_new: list[int]) -> StepInputs:
        """The step's inputs on the host, and the rows (into the packed tokens) of each sequence's
        last token where that token completes the sequence, so a new token is sampled."""
        bs = self.block_size
        ids, positions, slots, sample_rows = [], [], [], []
        for seq, n in zip(seqs, num_new):
            start = seq.num_computed_tokens
            ids += seq.token_ids[start:start + n]
            positions += range(start, start + n)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, start + n)]
            if start + n == seq.num_tokens:
                sample_rows.append(len(ids) - 1)
        context = [s.num_computed_tokens + n for s, n in zip(seqs, num_new)]
        return StepInputs(ids, positions, slots, self._block_tables(seqs), context, list(num_new), sample_rows)

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        """int32 [len(seqs), max_blocks_per_seq], each row a sequence's blocks, zero-padded."""
        width = self.max_blocks_per_seq
        tables = [seq.block_table + [0] * (width - len(seq.block_table)) for seq in seqs]
        return torch.tensor(tables, dtype=torch.int32).view(len(seqs), width)

    def metadata(self, step: StepInputs) -> PagedAttentionMetadata:
        def dev(x, dtype=torch.int64):
            return torch.as_tensor(x, dtype=dtype).to(self.device, non_blocking=True)

        num_decode = sum(1 for n in step.query_lens if n == 1)  # they come first
        prefill_lens = step.query_lens[num_decode:]
        cu = [0]
        for n in prefill_lens:
            cu.append(cu[-1] + n)
        return PagedAttentionMetadata(
            slot_mapping=dev(step.slot_mapping), block_tables=dev(step.block_tables, torch.int32),
            context_lens=dev(step.context_lens, torch.int32), num_decode=num_decode, query_lens=step.query_lens,
            context_lens_host=step.context_lens,
            prefill_cu_seqlens_q=dev(cu, torch.int32) if prefill_lens and self.cache.kernels.prefill else None)

    @torch.inference_mode()
    def execute(self, step: StepInputs, use_graph: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The model over one step's inputs -> (fp32 logits of its sample rows, their greedy tokens
        or None). Every tensor-parallel rank runs it; only rank 0 samples."""
        rows = step.sample_rows
        if use_graph:
            logits, greedy = self.graphs.run(step)
            if len(rows) < len(step.input_ids):
                logits, greedy = logits[rows], greedy[rows]
            return logits, greedy
        self.cache.set_metadata(self.metadata(step))
        # a decode-only step on the CPU may read fp16 copies of the weights (layers/cpu_weights.py)
        with decode_step(all(n == 1 for n in step.query_lens)):
            return self._forward(torch.tensor(step.input_ids).to(self.device, non_blocking=True),
                                 torch.tensor(step.positions).to(self.device, non_blocking=True), self.cache,
                                 rows), None

    @torch.inference_mode()
    def run_steps(self, batch: ScheduledBatch, steps: int) -> Iterator[list[int]]:
        """`steps` greedy decode steps of a decode-only batch whose blocks already hold them -> an
        iterator over the steps, each the token of every sequence (in the batch's order). From CUDA
        graphs every step is enqueued at once, its inputs made on the GPU, and each step's tokens
        are yielded as soon as the GPU has them; without graphs the steps run here, one after the
        other, each one's inputs made from the last tokens (the same steps, as one step at a time
        would run them)."""
        seqs = batch.seqs
        step = self.prepare(seqs, batch.num_new_tokens)
        if self.replays_runs(len(seqs)):
            if comm.world() > 1:
                # the other ranks replay the same run (tp_workers.py); every rank's greedy tokens are
                # the same, from the same gathered logits, so are the next inputs each makes
                with self._rank_failures():
                    comm.broadcast_object(("run", step, steps))
            return self.graphs.run_steps(step, steps)
        if comm.world() > 1:
            raise RuntimeError("runs of decode steps under tensor parallelism need CUDA graphs")
        return self._eager_steps(step, seqs, steps)

    @contextlib.contextmanager
    def _rank_failures(self):
        """A failed collective raised as the failure of the rank that caused it, where one said."""
        try:
            yield
        except Exception as e:
            raise (self.explain_failure(e) if self.explain_failure else e) from e

    def replays_runs(self, n: int) -> bool:
        """Whether a run of n sequences' steps replays CUDA graphs (else it runs eagerly, which
        tensor parallelism does not do in runs)."""
        return self.graphs is not None and n <= self.graphs.max_size

    def more_steps(self, batch: ScheduledBatch, steps: int) -> Iterator[list[int]]:
        """`steps` more greedy decode steps of the run last started by run_steps (or continued
        here), for the same batch, whose blocks now hold them too; enqueued behind the run's last
        step, so the GPU goes on while the host still takes that run's tokens. Single-process only."""
        if comm.world() > 1:
            raise RuntimeError("continuing a run of decode steps under tensor parallelism is not supported")
        tables = self._block_tables(batch.seqs)
        if self.replays_runs(len(batch.seqs)):
            return self.graphs.more_steps(tables, steps)
        step, seqs, tokens = self._eager_last
        step = dataclasses.replace(self._next_decode_step(step, seqs, tokens), block_tables=tables)
        return self._eager_steps(step, seqs, steps)

    def _eager_steps(self, step: StepInputs, seqs: list[Sequence], steps: int) -> Iterator[list[int]]:
        # all run before any is taken: taking a step may end a sequence and free its blocks
        out = []
        for i in range(steps):
            logits, _ = self.execute(step, use_graph=False)
            out.append(logits.argmax(-1).tolist())
            if i + 1 < steps:
                step = self._next_decode_step(step, seqs, out[-1])
        self._eager_last = (step, seqs, out[-1])  # where more_steps goes on from
        return iter(out)

    def _next_decode_step(self, step: StepInputs, seqs: list[Sequence], tokens: list[int]) -> StepInputs:
        """The decode step after `step`, whose sampled `tokens` become the inputs."""
        bs = self.block_size
        positions = [p + 1 for p in step.positions]
        slots = [seq.block_table[p // bs] * bs + p % bs for seq, p in zip(seqs, positions)]
        return StepInputs(list(tokens), positions, slots, step.block_tables, [c + 1 for c in step.context_lens],
                          step.query_lens, step.sample_rows)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[list[int | None], list]:
        """-> per sequence of the batch (in its order): the sampled token or None (prompt not yet
        fully read), and its logprobs entry or None."""
        # decodes first, so the cache takes them as one group; stable, so the rest keep their order
        order = sorted(range(len(batch)), key=lambda i: batch.num_new_tokens[i] != 1)
        seqs = [batch.seqs[i] for i in order]
        num_new = [batch.num_new_tokens[i] for i in order]
        step = self.prepare(seqs, num_new)
        use_graph = self.graphs is not None and len(seqs) <= self.graphs.max_size and all(n == 1 for n in num_new)
        if comm.world() == 1:
            logits, greedy = self.execute(step, use_graph)
        else:
            with self._rank_failures():  # the other tensor-parallel ranks run the same step (tp_workers.py)
                comm.broadcast_object(("step", step, use_graph))
                logits, greedy = self.execute(step, use_graph)
        sampling = [s for s, n in zip(seqs, num_new) if s.num_computed_tokens + n == s.num_tokens]
        tokens, logprobs = [None] * len(batch), [None] * len(batch)
        if not sampling:
            return tokens, logprobs
        grammars = [s.grammar for s in sampling]
        if any(g is not None for g in grammars):
            # the masks are made on the CPU once the step is launched: on a GPU, while it runs
            logits = apply_bitmask(logits, allowed_tokens_bitmask(grammars, logits.shape[-1]))
            greedy = None
        if all(s.params.argmax_only for s in sampling):
            # the sampler's greedy rows, without building its batch: the common decode step
            new, lps = (greedy if greedy is not None else logits.argmax(-1)), None
        else:
            sb = SamplingBatch.build(sampling, [self._generator(s) for s in sampling], self.vocab_size, self.device)
            new, lps = sample(logits, sb)
        new = new.tolist()
        for g, token in zip(grammars, new):
            if g is not None:
                g.consume(token)
        by_seq = dict(zip((s.seq_id for s in sampling), zip(new, lps or [None] * len(sampling))))
        for i, seq in enumerate(batch.seqs):
            if seq.seq_id in by_seq:
                tokens[i], logprobs[i] = by_seq[seq.seq_id]
        return tokens, logprobs
