"""The step loop: requests in, one scheduled batch per step through the model runner, outputs
out to each request's sink. Thread-safe: `LLM.generate` and the async engine's thread may both
add requests and step; a lock serialises them, and every output reaches its own request's sink
whoever stepped."""
from __future__ import annotations

import itertools
import logging
import threading
from typing import Callable, Iterator

from lowbit.engine.block_manager import BlockManager
from lowbit.engine.config import EngineConfig
from lowbit.engine.model_runner import ModelRunner
from lowbit.engine.outputs import RequestOutput, RequestState
from lowbit.engine.sampling_params import SamplingParams
from lowbit.engine.scheduler import ScheduledBatch, Scheduler
from lowbit.engine.sequence import Sequence, SequenceStatus
from lowbit.engine.structured_output import GrammarCompiler
from lowbit.errors import LowbitError
from lowbit.parallel import comm

log = logging.getLogger(__name__)

Prompt = str | list[int]


class LLMEngine:
    def __init__(self, model, tokenizer, config: EngineConfig, eos_token_ids: set[int]):
        self.config = config.resolved(model.config)
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self.vocab_size = model.config.vocab_size
        self.runner = ModelRunner(model, self.config)
        c = self.config
        self.block_manager = BlockManager(self.runner.num_blocks, c.block_size, c.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, c.max_batch_size, c.max_num_batched_tokens, c.max_model_len)
        self.requests: dict[str, RequestState] = {}
        self.grammars = GrammarCompiler(tokenizer, self.vocab_size, self.eos_token_ids)
        self.lock = threading.RLock()
        self._next_id = itertools.count()
        # (batch, steps, per-step tokens): a run of decode steps enqueued on the GPU behind the one
        # before it (see step), taken by the next step() before anything is scheduled
        self._continued: tuple[ScheduledBatch, int, Iterator] | None = None
        self.runs_continued = 0  # runs enqueued that way (`lowbit bench generate` reports it)

    # -- requests ----------------------------------------------------------------------------
    def make_request(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
                     sink: Callable[[RequestOutput], None] | None = None, detokenize: bool = True) -> RequestState:
        """Checks and tokenizes a request without touching the engine's state; LowbitError says
        what is wrong with it. detokenize=False: outputs carry token ids only, no text, and a stop
        string is the listener's to find (it aborts the request then)."""
        params = params or SamplingParams()
        request_id = self.new_request_id() if request_id is None else str(request_id)
        text = prompt if isinstance(prompt, str) else None
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        where = f"request {request_id}"
        if not ids:
            raise LowbitError(f"{where}: empty prompt")
        if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in ids):
            raise LowbitError(f"{where}: prompt token ids must be integers in [0, {self.vocab_size})")
        if any(not 0 <= t < self.vocab_size for t in params.logit_bias):  # would fail the whole step
            raise LowbitError(f"{where}: logit_bias token ids must be in [0, {self.vocab_size})")
        if len(ids) > self.config.max_model_len:
            raise LowbitError(f"{where}: prompt has {len(ids)} tokens, more than max_model_len="
                              f"{self.config.max_model_len}; shorten it or raise max_model_len")
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        seq = Sequence(request_id, ids, params, stop_ids)
        if params.structured_output is not None:
            try:
                seq.grammar = self.grammars.matcher(params.structured_output)
            except LowbitError as e:
                raise LowbitError(f"{where}: {e}") from None
        return RequestState(seq, text, self.tokenizer, sink, detokenize)

    def new_request_id(self) -> str:
        return str(next(self._next_id))

    def add(self, state: RequestState) -> str:
        rid = state.seq.request_id
        with self.lock:
            if rid in self.requests:
                raise LowbitError(f"request id {rid!r} is already running; ids must be unique")
            self.requests[rid] = state
            self.scheduler.add(state.seq)
        return rid

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    sink: Callable[[RequestOutput], None] | None = None) -> str:
        return self.add(self.make_request(prompt, params, request_id, sink))

    def abort(self, request_id: str, error: LowbitError | None = None) -> None:
        """Stops a request and frees its cache; its sink gets a last output, finish_reason "abort"
        (or "error" with the error given). An unknown or finished id is ignored: the request may
        have finished meanwhile."""
        with self.lock:
            state = self.requests.get(request_id)
            if state is not None:
                state.error = error
                self.scheduler.finish(state.seq, "error" if error else "abort")
                self._emit([state])

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- the loop ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Runs one scheduled batch: one model step, or several greedy decode steps in a row
        (`steps_ahead`), whose tokens are then taken in one step at a time, as if run so.

        While the host takes a run's next-to-last step, the GPU runs its last; if the same batch may
        go on (`steps_continued`), its next run is enqueued right then, so the GPU never waits for the
        host between runs, and the next step() takes that run instead of scheduling."""
        with self.lock:
            batch, steps, per_step = self._continued or (None, 0, None)
            self._continued = None
            if batch is not None and not any(s.status == SequenceStatus.RUNNING for s in batch.seqs):
                batch = None  # all ended in the run before (their cache is freed): its tokens are dropped
            if batch is None:
                if not self.scheduler.has_work():
                    return []
                batch = self.scheduler.schedule()
                if not batch.seqs:  # the cache holds a max_model_len sequence, so something always fits
                    raise RuntimeError(f"scheduler made no progress: {self.scheduler.waiting}, {self.scheduler.running}")
                steps = self.steps_ahead(batch)
            outputs = []
            try:
                if per_step is None and steps > 1:
                    per_step = self.runner.run_steps(batch, steps)
                elif per_step is None:
                    outputs += self._take(batch, *self.runner.run(batch))
                # a run's steps are taken one at a time as the runner yields them: while the host
                # takes one step's tokens, the GPU runs the run's next steps
                for i, sampled in enumerate(per_step or ()):
                    outputs += self._take(batch, sampled, [None] * len(batch))
                    if i == steps - 2:  # the GPU runs the last step now: the next run goes behind it
                        more = self.steps_continued(batch)
                        if more:
                            self._continued = (batch, more, self.runner.more_steps(batch, more))
                            self.runs_continued += 1
            except Exception as e:  # the engine keeps serving; this step's requests fail
                log.exception("model step failed")
                self._continued = None
                # (_take fails only the request it was taking; those that finished earlier in the run
                # have gone out already)
                states = [self.requests[s.request_id] for s in batch.seqs if s.request_id in self.requests]
                for state in states:
                    state.error = LowbitError(f"request {state.seq.request_id}: the model step failed: {e}")
                    self.scheduler.finish(state.seq, "error")
                outputs += self._emit(states)
            return outputs

    def steps_ahead(self, batch: ScheduledBatch) -> int:
        """How many decode steps to run for `batch` before the host looks at their tokens: up to
        num_scheduler_steps when every sequence decodes greedily with nothing per token to do on the
        host (no grammar, logprobs, penalties or bias), past its first token (which goes out after
        one step, so the time to first token stays one step), nobody waits to be admitted, no
        sequence would pass max_tokens or max_model_len on the way, and the cache has blocks for all
        of it (taken here), and under tensor parallelism the run replays CUDA graphs on every rank.
        A sequence that stops on the way (a stop token or string) drops the tokens after it, as if
        those steps had not run; its cache past them is freed with it."""
        if comm.world() > 1 and not self.runner.replays_runs(len(batch)):
            return 1
        return max(1, self._run_length(batch, in_flight=0))

    def steps_continued(self, batch: ScheduledBatch) -> int:
        """How many decode steps may follow, for the same batch, the run whose last step the GPU
        runs now (the host has taken the others): steps_ahead's conditions, counted from that
        step's end, with every sequence still running; 0 for none (then the next step() schedules).
        Nobody waiting is checked here, so a request that arrives waits at most one run. Not under
        tensor parallelism (the other ranks replay only whole runs)."""
        if comm.world() > 1 or any(s.status != SequenceStatus.RUNNING for s in batch.seqs):
            return 0
        more = self._run_length(batch, in_flight=1)
        return more if more > 1 else 0

    def _run_length(self, batch: ScheduledBatch, in_flight: int) -> int:
        """Greedy decode steps `batch` may run unseen after the `in_flight` steps enqueued and not yet
        taken, with the blocks for all of them taken here; <= 1 when it may not run more than one."""
        ahead = self.num_scheduler_steps
        if ahead <= 1 or self.scheduler.waiting:
            return 1
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            p = seq.params
            if (n != 1 or seq.num_uncomputed_tokens != 1 or seq.num_output_tokens == 0 or seq.grammar is not None
                    or not p.argmax_only):
                return 1
            ahead = min(ahead, p.max_tokens - seq.num_output_tokens - in_flight,
                        self.config.max_model_len - seq.num_tokens - in_flight)
        bm = self.block_manager
        if ahead <= 1 or sum(bm.blocks_needed(seq, in_flight + ahead) for seq in batch.seqs) > bm.num_free_blocks:
            return 1
        for seq in batch.seqs:
            bm.allocate(seq, in_flight + ahead)
        return ahead

    @property
    def num_scheduler_steps(self) -> int:
        if self.config.num_scheduler_steps is not None:
            return self.config.num_scheduler_steps
        return 8 if self.runner.graphs is not None else 1

    def _take(self, batch: ScheduledBatch, sampled: list[int | None], logprobs: list) -> list[RequestOutput]:
        """Records one step's tokens: the sequences grow, stop or fail, and their outputs go out."""
        grown = self.scheduler.update(batch, sampled)
        lp_of = {s.seq_id: lp for s, lp in zip(batch.seqs, logprobs)}
        states = []
        for seq in grown:
            state = self.requests[seq.request_id]
            states.append(state)
            try:
                # a sampled stop token id ends the sequence without being appended
                if state.logprobs is not None and seq.num_output_tokens > state.num_tokens_seen:
                    state.logprobs.append(lp_of[seq.seq_id])
                if seq.grammar is not None and seq.grammar.error:
                    raise LowbitError(seq.grammar.error)
                # a complete grammar admits no more tokens: done, even with ignore_eos
                if state.on_new_tokens() or (seq.grammar is not None and seq.grammar.done):
                    self.scheduler.finish(seq, "stop")
            except Exception as e:  # only this request fails
                log.exception("request %s failed", seq.request_id)
                state.error = LowbitError(f"request {seq.request_id}: {e}")
                self.scheduler.finish(seq, "error")
        return self._emit(states)

    def _emit(self, states: list[RequestState]) -> list[RequestOutput]:
        outputs = []
        for state in states:
            out = state.output()
            outputs.append(out)
            if out.finished:
                self.requests.pop(out.request_id, None)
                self.runner.release(state.seq)
            if state.sink is not None:
                try:
                    state.sink(out)
                except Exception:  # a broken listener must not stop the other requests
                    log.exception("output sink of request %s failed", out.request_id)
        return outputs
