"""The Triton kernel set (load_ops("triton")): same signatures as TORCH_OPS.

NOTE: importing this module decorates the kernels; on CPU that needs
TRITON_INTERPRET=1 set before the import (the interpreter is chosen at decoration).
"""

from __future__ import annotations

from lmservice.kernels.ops import KernelOps
from lmservice.kernels.triton_activation import bias_gelu_triton
from lmservice.kernels.triton_attention import (
    decode_attention_triton,
    plan_decode_triton,
    prefill_attention_triton,
)
from lmservice.kernels.triton_kv_cache import write_kv_cache_triton
from lmservice.kernels.triton_lora import add_lora_triton
from lmservice.kernels.triton_norm import add_layer_norm_triton

TRITON_OPS = KernelOps(
    name="triton",
    write_kv_cache=write_kv_cache_triton,
    prefill_attention=prefill_attention_triton,
    decode_attention=decode_attention_triton,
    plan_decode=plan_decode_triton,
    add_layer_norm=add_layer_norm_triton,
    bias_gelu=bias_gelu_triton,
    add_lora=add_lora_triton,
)
