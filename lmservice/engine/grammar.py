"""Token masks for constrained rows: each such sequence owns a grammar matcher (an llguidance LLMatcher,
compiled above the engine by lmservice/serving/structured.py); before sampling, the rows that carry one
get a bitmask of the tokens their grammar allows next, applied to the logits as -inf elsewhere.

The bitmask layout is llguidance's (and xgrammar's): int32 words, bit j of word w is token 32w + j.
llguidance is imported only when a batch has a constrained row.
"""

from __future__ import annotations

import torch


class GrammarMasks:
    """Fills one step's bitmask for the constrained rows of a batch (other rows: every bit set)."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._executor = None
        self._shifts = torch.arange(32, dtype=torch.int32)

    def fill(self, matchers: list[object | None]) -> torch.Tensor | None:
        """(rows, ceil(V / 32)) int32 bitmask, or None when no row is constrained."""
        rows = [(m, i) for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        import llguidance  # only with structured output
        import llguidance.torch as llt

        if self._executor is None:
            self._executor = llguidance.LLExecutor(num_threads=1)  # 2 threads were slower on 2 cores
        bitmask = torch.full((len(matchers), (self.vocab_size + 31) // 32), -1, dtype=torch.int32)
        llt.fill_next_token_bitmask_par(self._executor, rows, bitmask)
        return bitmask

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
        """Disallowed tokens -> -inf (a new tensor). logits: (B, V); bitmask: (B, ceil(V / 32))."""
        num_rows, vocab = logits.shape
        bm = bitmask.to(logits.device)
        allowed = ((bm.unsqueeze(-1) >> self._shifts.to(bm.device)) & 1).bool().view(num_rows, -1)[:, :vocab]
        return logits.masked_fill(~allowed, float("-inf"))
