"""Residual add fused with LayerNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def add_layer_norm_torch(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + residual (or x when residual is None); returns (layer_norm(h), h).
    x, residual: (num_tokens, hidden)."""
    h = x if residual is None else x + residual
    return F.layer_norm(h, (h.shape[-1],), weight, bias, eps), h
