"""The block manager and scheduler alone: no model, no tensors."""
import pytest

from lowbit.engine.block_manager import BlockManager
from lowbit.engine.sampling_params import SamplingParams
from lowbit.engine.scheduler import Scheduler
from lowbit.engine.sequence import Sequence, SequenceStatus
from lowbit.errors import LowbitError


def _seq(tokens, max_tokens=16):
    return Sequence("r", list(tokens), SamplingParams(max_tokens=max_tokens))


def _compute(bm, seq, n):
    """What a step does to the sequence's cache bookkeeping."""
    bm.allocate(seq, n)
    before = seq.num_computed_tokens
    seq.num_computed_tokens += n
    bm.commit(seq, before)


def test_allocate_and_free_return_every_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = _seq(range(10)), _seq(range(100, 105))
    _compute(bm, a, 10)
    _compute(bm, b, 5)
    assert len(a.block_table) == 3 and len(b.block_table) == 2
    assert not set(a.block_table) & set(b.block_table)
    assert bm.num_free_blocks == 3
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8 and a.block_table == [] and b.block_table == []


def test_growth_takes_a_block_only_when_the_last_is_full():
    bm = BlockManager(num_blocks=4, block_size=4)
    s = _seq(range(3))
    _compute(bm, s, 3)
    assert len(s.block_table) == 1
    assert bm.blocks_needed(s, 1) == 0  # token 4 fits in block 0
    _compute(bm, s, 1)
    assert bm.blocks_needed(s, 1) == 1
    _compute(bm, s, 1)
    assert len(s.block_table) == 2


def test_out_of_blocks_is_refused():
    bm = BlockManager(num_blocks=2, block_size=4)
    s = _seq(range(12))
    assert not bm.can_allocate(s, 12)
    with pytest.raises(LowbitError, match="out of blocks"):
        bm.allocate(s, 12)


def test_shared_prefix_is_found_and_ref_counted():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = _seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    _compute(bm, a, 9)
    b = _seq([1, 2, 3, 4, 5, 6, 7, 8, 42, 43])
    prefix = bm.cached_prefix(b)
    assert prefix == a.block_table[:2]
    bm.claim_prefix(b, prefix)
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert [bm.blocks[i].ref_count for i in prefix] == [2, 2]
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in prefix] == [1, 1]
    assert bm.prefix_hit_tokens == 8


def test_a_different_earlier_block_breaks_the_chain():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = _seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    _compute(bm, a, 9)
    # block 1 equal, block 0 different: the chained hash must not match block 1
    assert bm.cached_prefix(_seq([0, 2, 3, 4, 5, 6, 7, 8, 9])) == []


def test_the_last_token_is_never_a_hit():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = _seq(range(8))
    _compute(bm, a, 8)
    # an identical 8-token prompt still computes its last block, for the logits of token 8
    assert len(bm.cached_prefix(_seq(range(8)))) == 1
    assert len(bm.cached_prefix(_seq(range(9)))) == 2


def test_freed_cached_blocks_stay_findable_until_evicted_lru():
    bm = BlockManager(num_blocks=5, block_size=2)
    a, b = _seq([1, 2, 3, 4, 5]), _seq([7, 8, 9])
    _compute(bm, a, 5)  # blocks: [1,2] [3,4] [5]
    _compute(bm, b, 3)  # blocks: [7,8] [9]
    assert bm.num_free_blocks == 0
    bm.free(a)  # [1,2] and [3,4] stay cached, [5] goes plain free
    bm.free(b)  # [7,8] cached, freed after a's
    assert bm.num_free_blocks == 5 and len(bm.free_cached) == 3
    assert len(bm.cached_prefix(_seq([1, 2, 3, 4, 0]))) == 2
    # the plain free blocks go first, then the least recently freed cached one: a's tail [3,4]
    c = _seq([0] * 6)
    _compute(bm, c, 6)
    assert len(bm.cached_prefix(_seq([1, 2, 3, 4, 0]))) == 1
    assert len(bm.cached_prefix(_seq([7, 8, 0]))) == 1
    # reviving a free cached block takes it out of the free pool
    d = _seq([7, 8, 0])
    prefix = bm.cached_prefix(d)
    assert bm.blocks_needed(d, 1, prefix) == 2  # its own new block + the revived one
    bm.claim_prefix(d, prefix)
    assert bm.num_free_blocks == 1


def test_prefix_caching_off_finds_nothing():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = _seq(range(9))
    _compute(bm, a, 9)
    assert bm.cached_prefix(_seq(range(9))) == []
    bm.free(a)
    assert len(bm.free_cached) == 0


def _run(sched, steps=1000):
    """Drives the scheduler with a fake model that always samples token 7."""
    done, batches = [], []
    for _ in range(steps):
        if not sched.has_work():
            break
        batch = sched.schedule()
        assert batch.num_tokens <= sched.max_num_batched_tokens and len(batch) <= sched.max_batch_size
        batches.append(batch)
        sampled = [7 if s.num_computed_tokens + n == s.num_tokens else None
                   for s, n in zip(batch.seqs, batch.num_new_tokens)]
        sched.update(batch, sampled)
        done += [s for s in batch.seqs if s.is_finished and s not in done]
    return done, batches


def test_scheduler_chunks_long_prompts_and_keeps_decoding():
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(bm, max_batch_size=4, max_num_batched_tokens=8, max_model_len=64)
    short = _seq(range(3), max_tokens=6)
    sched.add(short)
    batch = sched.schedule()
    sched.update(batch, [7])
    long = _seq(range(30), max_tokens=2)
    sched.add(long)
    # while `long` is read in chunks, `short` decodes every step
    for _ in range(3):
        batch = sched.schedule()
        assert batch.seqs[0] is short and batch.num_new_tokens[0] == 1
        assert batch.seqs[1] is long and batch.num_new_tokens[1] == 7
        sched.update(batch, [7, None])
    done, _ = _run(sched)
    assert {s.finish_reason for s in done} == {"length"}
    assert short.output_token_ids == [7] * 6 and long.output_token_ids == [7] * 2
    assert bm.num_free_blocks == 64


def test_scheduler_preempts_the_newest_and_finishes_everyone():
    bm = BlockManager(num_blocks=6, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(bm, max_batch_size=8, max_num_batched_tokens=64, max_model_len=24)
    seqs = [_seq(range(i, i + 5), max_tokens=12) for i in range(3)]
    for s in seqs:
        sched.add(s)
    done, batches = _run(sched)
    assert sched.num_preemptions > 0
    first_preempted = next(b.preempted[0] for b in batches if b.preempted)
    assert first_preempted is seqs[-1]
    assert len(done) == 3 and all(s.output_token_ids == [7] * 12 for s in seqs)
    assert bm.num_free_blocks == 6


def test_scheduler_respects_max_batch_size():
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(bm, max_batch_size=2, max_num_batched_tokens=64, max_model_len=64)
    seqs = [_seq([i, 1, 2], max_tokens=3) for i in range(5)]
    for s in seqs:
        sched.add(s)
    done, batches = _run(sched)
    assert max(len(b) for b in batches) == 2 and len(done) == 5


def test_finish_frees_a_waiting_or_running_sequence():
    bm = BlockManager(num_blocks=8, block_size=4)
    sched = Scheduler(bm, max_batch_size=1, max_num_batched_tokens=64, max_model_len=64)
    a, b = _seq(range(5)), _seq(range(5))
    sched.add(a)
    sched.add(b)
    sched.schedule()
    assert a.status == SequenceStatus.RUNNING and b.status == SequenceStatus.WAITING
    sched.finish(a, "abort")
    sched.finish(b, "abort")
    sched.finish(b, "abort")  # twice is harmless
    assert not sched.has_work() and bm.num_free_blocks == 8 and a.finish_reason == "abort"
