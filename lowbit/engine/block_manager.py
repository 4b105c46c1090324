"""Owns the KV cache's block ids: hands them to sequences as they grow, takes them back, and
keeps full blocks findable by content so identical prompt prefixes share them (prefix caching).

A full block's hash chains the previous block's hash with the block's token ids, so a hit on
block i means the whole prefix up to block i matches. Freed blocks that hold a hash stay
findable until their id is needed again; they are reused least-recently-freed first.
"""
from __future__ import annotations

from collections import OrderedDict, deque

from lowbit.engine.sequence import Sequence
from lowbit.errors import LowbitError


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None  # set once the block is full and computed
        self.token_ids: tuple[int, ...] = ()  # kept to tell a hash collision from a hit

    def reset(self) -> None:
        self.ref_count, self.hash, self.token_ids = 0, None, ()


def block_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise LowbitError(f"KV cache of {num_blocks} blocks of {block_size} tokens: both must be at least 1")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block: dict[int, int] = {}
        self.free_uncached: deque[int] = deque(range(num_blocks))  # reused first: nothing to lose
        self.free_cached: OrderedDict[int, None] = OrderedDict()  # least recently freed first
        self.prefix_query_tokens = 0  # prompt tokens looked up at admission
        self.prefix_hit_tokens = 0  # of those, found in the cache

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_uncached) + len(self.free_cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _is_cached(self, block: Block) -> bool:
        return block.hash is not None and self.hash_to_block.get(block.hash) == block.block_id

    # -- admission -------------------------------------------------------------------------
    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Ids of cached blocks equal to the sequence's leading full blocks; no side effects.
        At most num_tokens - 1 tokens hit, so the last token is always computed for its logits."""
        if not self.enable_prefix_caching or seq.block_table:
            return []
        hits, parent = [], None
        for i in range((seq.num_tokens - 1) // self.block_size):
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = block_hash(parent, tokens)
            bid = self.hash_to_block.get(h)
            if bid is None or self.blocks[bid].token_ids != tokens:
                break
            hits.append(bid)
            parent = h
        return hits

    def blocks_needed(self, seq: Sequence, num_new_tokens: int, prefix: list[int] = ()) -> int:
        """Free blocks that claiming `prefix` and then computing num_new_tokens more would take."""
        have = len(seq.block_table) + len(prefix)
        computed = seq.num_computed_tokens + len(prefix) * self.block_size
        revived = sum(1 for bid in prefix if self.blocks[bid].ref_count == 0)
        return max(0, self.blocks_for(computed + num_new_tokens) - have) + revived

    def can_allocate(self, seq: Sequence, num_new_tokens: int, prefix: list[int] = ()) -> bool:
        return self.blocks_needed(seq, num_new_tokens, prefix) <= self.num_free_blocks

    def claim_prefix(self, seq: Sequence, prefix: list[int]) -> None:
        """Shares the cached blocks with `seq`, whose cache then starts after them."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        for bid in prefix:
            block = self.blocks[bid]
            if block.ref_count == 0:
                del self.free_cached[bid]
            block.ref_count += 1
        seq.block_table = list(prefix)
        seq.num_computed_tokens = seq.num_cached_tokens = len(prefix) * self.block_size
        if self.enable_prefix_caching:
            self.prefix_query_tokens += seq.num_tokens
            self.prefix_hit_tokens += seq.num_cached_tokens

    # -- growth ----------------------------------------------------------------------------
    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Gives `seq` blocks enough for num_new_tokens more tokens; check can_allocate first."""
        need = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if need > self.num_free_blocks:
            raise LowbitError(f"KV cache out of blocks: {need} needed, {self.num_free_blocks} free")
        for _ in range(need):
            seq.block_table.append(self._take_free())

    def _take_free(self) -> int:
        if self.free_uncached:
            bid = self.free_uncached.popleft()
        else:
            bid, _ = self.free_cached.popitem(last=False)
            del self.hash_to_block[self.blocks[bid].hash]
        block = self.blocks[bid]
        block.reset()
        block.ref_count = 1
        return bid

    def commit(self, seq: Sequence, num_computed_before: int) -> None:
        """Hashes the blocks that the last step filled (call after num_computed_tokens grew)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(num_computed_before // bs, seq.num_computed_tokens // bs):
            block = self.blocks[seq.block_table[i]]
            if block.hash is not None:  # a shared block, hashed by whoever computed it
                continue
            parent = self.blocks[seq.block_table[i - 1]].hash if i > 0 else None
            block.token_ids = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            block.hash = block_hash(parent, block.token_ids)
            # the same content computed twice at once: the first copy stays the one found
            self.hash_to_block.setdefault(block.hash, block.block_id)

    def free(self, seq: Sequence) -> None:
        """Returns the sequence's blocks. Last block first, so a prefix's tail is reused before
        its head: a head block is worth more, every longer prefix passes through it."""
        for bid in reversed(seq.block_table):
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count > 0:
                continue
            if self._is_cached(block):
                self.free_cached[bid] = None
            else:
                block.reset()
                self.free_uncached.append(bid)
        seq.block_table = []
