"""Per-sequence KV bookkeeping on top of the block pool: prefix hits, slot allocation, release (torch-free)."""

from __future__ import annotations

from lmservice.engine.block_pool import BlockPool, hash_block
from lmservice.engine.request import Sequence


class KVCacheManager:
    """Gives sequences the blocks they need and publishes their full blocks to the prefix cache.

    With prefix caching off, blocks are still shared inside one request: the n
    sequences of a request with n > 1 compute the prompt once. The hash salt then
    includes the request, so no other request can find them.
    """

    def __init__(self, pool: BlockPool, enable_prefix_caching: bool = True) -> None:
        self.pool = pool
        self.block_size = pool.block_size
        self.enable_prefix_caching = enable_prefix_caching

    def _salt(self, seq: Sequence) -> object:
        return seq.prefix_cache_salt if self.enable_prefix_caching else (seq.group_id, seq.prefix_cache_salt)

    def _extend_hashes(self, seq: Sequence, num_full_blocks: int) -> None:
        """Chained hashes of seq's first `num_full_blocks` blocks (cached on the sequence)."""
        bs = self.block_size
        hashes = seq.block_hashes
        parent = hashes[-1] if hashes else None
        salt = self._salt(seq)
        for i in range(len(hashes), num_full_blocks):
            parent = hash_block(parent, tuple(seq.token_slice(i * bs, (i + 1) * bs)), salt)
            hashes.append(parent)

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks holding a leading run of seq's tokens. At least one token is left to
        compute, since the step must produce its logits. Prompt logprobs need every
        prompt position computed, so those sequences skip the cache, and so do embeddings
        (they pool the hidden state of every prompt token)."""
        if seq.params.prompt_logprobs is not None or seq.task == "embed":
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        self._extend_hashes(seq, max_blocks)
        hits = self.pool.lookup(seq.block_hashes[:max_blocks])
        del seq.block_hashes[len(hits):]
        return hits

    def allocate_slots(self, seq: Sequence, num_new_tokens: int, cached_block_ids: list[int] = (),
                       num_lookahead: int = 0) -> bool:
        """Make room for `num_new_tokens` more tokens of seq (after taking its cached
        prefix blocks), plus `num_lookahead` slots after them for speculative guesses (never
        published to the prefix cache: they are not the sequence's tokens until verified).
        False, with nothing changed, when the pool is too short."""
        cached_block_ids = list(cached_block_ids)
        num_computed = seq.num_computed_tokens + len(cached_block_ids) * self.block_size
        total = num_computed + num_new_tokens
        num_needed = -(-(total + num_lookahead) // self.block_size) - len(seq.block_ids) - len(cached_block_ids)
        num_cached_free = sum(1 for b in cached_block_ids if self.pool.blocks[b].ref_count == 0)
        if num_needed + num_cached_free > self.pool.num_free_blocks:
            return False
        if cached_block_ids:
            self.pool.touch(cached_block_ids)
            seq.block_ids.extend(cached_block_ids)
            seq.num_computed_tokens = num_computed
        if num_needed > 0:
            seq.block_ids.extend(self.pool.allocate(num_needed))
        # Publish the blocks this step fills. Same-step sharing is safe: every layer
        # writes the whole batch's K/V before any sequence attends.
        first_new = len(seq.block_hashes)
        self._extend_hashes(seq, total // self.block_size)
        for i in range(first_new, len(seq.block_hashes)):
            self.pool.register(seq.block_ids[i], seq.block_hashes[i])
        return True

    def trim(self, seq: Sequence) -> None:
        """Give back the blocks past the slots seq's tokens need (those that held rejected guesses)."""
        keep = -(-seq.num_tokens // self.block_size)
        if len(seq.block_ids) > keep:
            self.pool.free(seq.block_ids[keep:])
            del seq.block_ids[keep:]

    def forget(self, seq: Sequence) -> None:
        """Withdraw seq's blocks from the prefix cache: a failed step may have left them unwritten
        (hashes are published when the step is scheduled) or holding non-finite values."""
        for block_id in seq.block_ids:
            self.pool.unregister(block_id)

    def free(self, seq: Sequence) -> None:
        self.pool.free(seq.block_ids)
        seq.block_ids = []
        seq.block_hashes = []

    def record_lookup(self, seq: Sequence, num_hit_blocks: int) -> None:
        """Prefix-cache statistics, counted once per sequence at its first scheduling."""
        self.pool.num_queries += seq.num_prompt_tokens
        self.pool.num_hits += num_hit_blocks * self.block_size
