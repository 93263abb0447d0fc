"""KV-cache block pool: free list, ref counts, automatic prefix caching (torch-free).

A block holding `block_size` computed tokens is registered under a hash of its
token chain (parent block's hash, its own tokens, and a salt such as the LoRA
adapter), so a later sequence with the same prefix reuses it. Blocks whose ref
count drops to zero go to the tail of the free queue but keep their hash: they
stay reusable until allocation takes them from the head (LRU eviction).

Invariant: every block is either referenced (ref_count > 0) or in the free
queue, never both.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None


class NoFreeBlocksError(RuntimeError):
    pass


def hash_block(parent_hash: int | None, token_ids: tuple[int, ...], salt: object) -> int:
    """Chained 128-bit BLAKE2b hash of one full block. NOTE: a cryptographic hash, not
    Python's hash(): a tenant must not be able to craft tokens whose blocks collide
    with another tenant's prefix and read its KV."""
    digest = hashlib.blake2b(repr((parent_hash, token_ids, salt)).encode(), digest_size=16).digest()
    return int.from_bytes(digest, "little")


class BlockPool:
    """Fixed set of `num_blocks` KV blocks of `block_size` tokens."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.num_queries = 0  # prompt tokens looked up in the prefix cache
        self.num_hits = 0  # prompt tokens found there

    # --- counts ---
    @property
    def num_free_blocks(self) -> int:
        """Blocks that allocation can take (free, possibly still holding an evictable cached prefix)."""
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    # --- allocation ---
    def allocate(self, num: int) -> list[int]:
        """Take `num` blocks from the head of the free queue (least recently freed first),
        evicting any cached prefix they held."""
        if num > len(self.free_queue):
            raise NoFreeBlocksError(f"asked for {num} blocks, {len(self.free_queue)} free")
        ids = []
        for _ in range(num):
            block_id, _ = self.free_queue.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                if self.cached.get(block.block_hash) == block_id:
                    del self.cached[block.block_hash]
                block.block_hash = None
            block.ref_count = 1
            ids.append(block_id)
        return ids

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference to each block. Freed in reverse so that a sequence's tail
        blocks (the least shareable) are evicted before its head blocks."""
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"block {block_id} freed twice"
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None

    def touch(self, block_ids: list[int]) -> None:
        """Take a reference to blocks: cached ones found by `lookup`, or a forked sequence's parent's."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_queue[block_id]
            block.ref_count += 1

    # --- prefix cache ---
    def lookup(self, block_hashes: list[int]) -> list[int]:
        """Longest run of leading blocks already cached under these chained hashes."""
        hits = []
        for h in block_hashes:
            block_id = self.cached.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def register(self, block_id: int, block_hash: int) -> None:
        """Publish a full block under its chained hash (first writer wins on duplicates)."""
        block = self.blocks[block_id]
        if block.block_hash is not None:
            return
        if block_hash not in self.cached:
            self.cached[block_hash] = block_id
            block.block_hash = block_hash

    def unregister(self, block_id: int) -> None:
        """Withdraw a block from the prefix cache (its KV is not to be trusted)."""
        block = self.blocks[block_id]
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) == block_id:
                del self.cached[block.block_hash]
            block.block_hash = None
