"""Per-sequence KV bookkeeping on top of the block pool: prefix hits, slot allocation, release (torch-free)."""

from __future__ import annotations

from lmservice.engine.block_pool import BlockPool, hash_block
from lmservice.engine.request import Sequence


class KVCacheManager:
    """Gives sequences the blocks they need and publishes their full blocks to the prefix cache.

    With prefix caching off, blocks are still shared inside one request: the n
    sequences of a request with n > 1 compute the prompt once. The hash salt then
    includes the request, so no other request can find them.

    A fork (beam search) shares all of its parent's blocks. NOTE: only a partly filled
    block is ever written while shared, and never in place: the sequence about to write
    into it gets a copy first (copy-on-write), recorded for the runner to make before the
    step's forward (`take_block_copies`).
    """

    def __init__(self, pool: BlockPool, enable_prefix_caching: bool = True) -> None:
        self.pool = pool
        self.block_size = pool.block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._block_copies: list[tuple[int, int]] = []  # (source, destination) block ids, in order

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
        shared = self._shared_write_block(seq, num_computed) if num_new_tokens > 0 else None
        if num_needed + num_cached_free + (shared is not None) > self.pool.num_free_blocks:
            return False
        if shared is not None:
            self._copy_on_write(seq, shared)
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

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """child continues from parent's computed tokens: it takes a reference to each of parent's blocks."""
        self.pool.touch(parent.block_ids)
        child.block_ids = list(parent.block_ids)
        child.block_hashes = list(parent.block_hashes)
        child.num_computed_tokens = parent.num_computed_tokens

    def _shared_write_block(self, seq: Sequence, num_computed: int) -> int | None:
        """Index in seq.block_ids of the partly filled block its next token lands in, if another sequence
        holds it too (a fork's parent or sibling); None otherwise."""
        if num_computed % self.block_size == 0:
            return None
        i = num_computed // self.block_size
        return i if self.pool.blocks[seq.block_ids[i]].ref_count > 1 else None

    def _copy_on_write(self, seq: Sequence, i: int) -> None:
        (copy,) = self.pool.allocate(1)
        source = seq.block_ids[i]
        seq.block_ids[i] = copy
        self.pool.free([source])  # still held by the others
        self._block_copies.append((source, copy))

    def take_block_copies(self) -> list[tuple[int, int]]:
        """The (source, destination) copies recorded since the last call, handed over once: the runner makes
        them, in order, before the forward of the step that scheduled them."""
        copies, self._block_copies = self._block_copies, []
        return copies

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
