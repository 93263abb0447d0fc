"""Bias add fused with GELU (tanh approximation, as GPT-2 uses)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Every config.json activation_function name of the tanh GELU: what bias_gelu and the C decode step compute.
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def bias_gelu_torch(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """gelu_tanh(x + bias); x: (num_tokens, n), bias: (n,)."""
    return F.gelu(x if bias is None else x + bias, approximate="tanh")
