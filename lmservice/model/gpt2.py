"""GPT-2 for serving: one flat batch of tokens from many sequences, attention over the paged KV cache.

Parameter names are Hugging Face's (`transformer.wte`, `transformer.h.N.attn.c_attn`,
`lm_head`, `score`), so checkpoints load by name. HF stores c_attn / c_proj / c_fc
as Conv1D with (in, out) weights; the loader transposes them into nn.Linear's
(out, in) once, at load.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lmservice.kernels import TORCH_CPU_KERNELS, CpuKernels, KernelOps
from lmservice.kernels.activation import TANH_GELU
from lmservice.kernels.cpu_native import DecodeStepWeights, LayerWeights, LinearWeights
from lmservice.kernels.kv_cache import LayerKVCache
from lmservice.model.config import GPT2Config


@dataclass
class AttentionMetadata:
    """How the step's flat token batch maps onto sequences and the cache.

    NOTE: the first `num_decode_tokens` tokens are single-token queries, one per
    sequence (decodes); the rest are prefill chunks packed back to back.
    slot_mapping[t] = -1 marks padding that must not be written.
    """

    slot_mapping: torch.Tensor  # (num_tokens,) int64
    num_decode_tokens: int
    decode_seq_lens: torch.Tensor  # (num_decodes,) int32
    decode_block_tables: torch.Tensor  # (num_decodes, max_blocks) int32
    prefill_cu_seqlens_q: torch.Tensor  # (num_prefills + 1,) int32, offsets from the first prefill token
    prefill_seq_lens: torch.Tensor  # (num_prefills,) int32
    prefill_block_tables: torch.Tensor  # (num_prefills, max_blocks) int32
    decode_plan: object = None  # ops.plan_decode(decode_seq_lens, decode_block_tables, block_size), once per step


class LoRAHook(Protocol):
    """Adds each token's adapter delta to a projection's or an embedding's output (lmservice/model/lora.py)."""

    def apply(self, module_key: str, x: torch.Tensor, y: torch.Tensor) -> None: ...

    def apply_embedding(self, module_key: str, indices: torch.Tensor, y: torch.Tensor) -> None: ...


def _linear(module: nn.Module, key: str, x: torch.Tensor, lora: LoRAHook | None, bias: bool = True) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        y = F.linear(x, module.weight, module.bias if bias else None)
    else:  # a quantized projection (lmservice/model/quantize.py)
        y = module(x, with_bias=bias)
    if lora is not None:
        lora.apply(key, x, y)
    return y


class GPT2Attention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.n_head, self.head_dim, self.n_embd = config.n_head, config.head_dim, config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        scale = 1.0 / math.sqrt(self.head_dim) if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= float(layer_idx + 1)
        self.scale = scale
        self.prefix = f"h.{layer_idx}."

    def forward(self, x: torch.Tensor, kv_cache: tuple[torch.Tensor, ...], meta: AttentionMetadata,
                ops: KernelOps, lora: LoRAHook | None) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = _linear(self.c_attn, self.prefix + "attn.c_attn", x, lora)  # (T, 3C)
        q, k, v = qkv.view(num_tokens, 3, self.n_head, self.head_dim).unbind(1)  # each (T, nh, hd)
        k_cache, v_cache, k_scales, v_scales = LayerKVCache(*kv_cache)  # scales: an int8 cache's, else None
        # Write first, then attend: prefix-cached and chunked prefills read their
        # context (and same-step siblings' blocks) from the cache alone.
        ops.write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping, k_scales, v_scales)
        nd = meta.num_decode_tokens
        if nd == num_tokens:
            out = ops.decode_attention(q, k_cache, v_cache, meta.decode_seq_lens, meta.decode_block_tables, self.scale,
                                       meta.decode_plan, k_scales, v_scales)
        elif nd == 0:
            out = ops.prefill_attention(q, k_cache, v_cache, meta.prefill_cu_seqlens_q, meta.prefill_seq_lens,
                                        meta.prefill_block_tables, self.scale, k_scales, v_scales)
        else:
            out = torch.empty_like(q)
            out[:nd] = ops.decode_attention(q[:nd], k_cache, v_cache, meta.decode_seq_lens,
                                            meta.decode_block_tables, self.scale, meta.decode_plan, k_scales, v_scales)
            out[nd:] = ops.prefill_attention(q[nd:], k_cache, v_cache, meta.prefill_cu_seqlens_q,
                                             meta.prefill_seq_lens, meta.prefill_block_tables, self.scale, k_scales,
                                             v_scales)
        return _linear(self.c_proj, self.prefix + "attn.c_proj", out.reshape(num_tokens, self.n_embd), lora)


class GPT2MLP(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.n_inner)
        self.c_proj = nn.Linear(config.n_inner, config.n_embd)
        self.activation = config.activation_function
        self.prefix = f"h.{layer_idx}."

    def forward(self, x: torch.Tensor, ops: KernelOps, lora: LoRAHook | None) -> torch.Tensor:
        if self.activation in TANH_GELU:
            fused = ops.gelu_adds_bias
            h = _linear(self.c_fc, self.prefix + "mlp.c_fc", x, lora, bias=not fused)  # (T, n_inner)
            h = ops.bias_gelu(h, self.c_fc.bias if fused else None)
        else:
            h = _linear(self.c_fc, self.prefix + "mlp.c_fc", x, lora)
            h = F.gelu(h) if self.activation == "gelu" else F.relu(h)
        return _linear(self.c_proj, self.prefix + "mlp.c_proj", h, lora)


class GPT2Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config, layer_idx)


class GPT2Transformer(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        # NOTE: `_weight` skips reset_parameters: the checkpoint assigns every weight (lmservice/model/loader.py),
        # and a random init on the meta device makes torch 2.13 import torch._dynamo (2 s of start-up).
        self.wte = nn.Embedding(config.vocab_size, config.n_embd,
                                _weight=torch.empty(config.vocab_size, config.n_embd))
        self.wpe = nn.Embedding(config.n_positions, config.n_embd,
                                _weight=torch.empty(config.n_positions, config.n_embd))
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)


class GPT2ForServing(nn.Module):
    """GPT-2 with an LM head and, for classifier checkpoints, a score head.

    forward() maps a flat batch of tokens (T,) to final hidden states (T, C);
    the heads are applied afterwards only to the rows that need them.
    """

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.transformer = GPT2Transformer(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.score = nn.Linear(config.n_embd, config.num_labels, bias=False) if config.is_classifier else None
        self._kernels = TORCH_CPU_KERNELS  # use_cpu_kernels hands the policy over

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, ...]], ops: KernelOps,
                lora: LoRAHook | None = None) -> torch.Tensor:
        t = self.transformer
        h = self.embed(input_ids, positions)  # (T, C)
        if lora is not None:
            lora.apply_embedding("wte", input_ids, h)
            lora.apply_embedding("wpe", positions, h)
        residual = None
        for block, kv_cache in zip(t.h, kv_caches, strict=True):
            x, residual = ops.add_layer_norm(h, residual, block.ln_1.weight, block.ln_1.bias, block.ln_1.eps)
            h = block.attn(x, kv_cache, meta, ops, lora)
            x, residual = ops.add_layer_norm(h, residual, block.ln_2.weight, block.ln_2.bias, block.ln_2.eps)
            h = block.mlp(x, ops, lora)
        out, _ = ops.add_layer_norm(h, residual, t.ln_f.weight, t.ln_f.bias, t.ln_f.eps)
        return out

    def embed(self, input_ids: torch.Tensor | list[int], positions: torch.Tensor,
              dtype: torch.dtype | None = None) -> torch.Tensor:
        """Token + position embeddings (T, C): a fresh tensor, summed in `dtype` (default: the model's)."""
        t = self.transformer
        wte, wpe = t.wte.weight[input_ids], t.wpe.weight[positions]
        return wte + wpe if dtype is None else wte.to(dtype) + wpe.to(dtype)

    def _projection_slots(self) -> list[tuple[nn.Module, str]]:
        slots = [(owner, name) for block in self.transformer.h for owner, name in
                 ((block.attn, "c_attn"), (block.attn, "c_proj"), (block.mlp, "c_fc"), (block.mlp, "c_proj"))]
        return [*slots, (self, "lm_head")]

    def swap_linears(self, make: Callable[[nn.Module], nn.Module]) -> int:
        """Replace every projection and the LM head by make(module) (int8, oneDNN); returns how many."""
        slots = self._projection_slots()
        for owner, name in slots:
            setattr(owner, name, make(getattr(owner, name)))
        return len(slots)

    def use_cpu_kernels(self, kernels: CpuKernels) -> None:
        """Hand the CPU-kernel policy (lmservice/kernels/cpu_policy.py) to every projection that can run C
        (OneDNNLinear, Int8Linear). Until then they run torch ops only. NOTE: the model serves one engine."""
        for owner, name in self._projection_slots():
            hand = getattr(getattr(owner, name), "use_cpu_kernels", None)
            if hand is not None:
                hand(kernels)
        self._kernels = kernels

    def decode_step_weights(self, kv_caches: list[tuple[torch.Tensor, ...]]) -> DecodeStepWeights | None:
        """What a whole decode step in C (lmservice/kernels/cpu_native.py NativeDecodeStep) reads of this model
        and its caches; None where a layer is not one it computes: an activation other than tanh GELU,
        LayerNorms of different eps, weights that are not float32 or bfloat16 on the CPU, caches not on the CPU
        (any --kv-cache-dtype is fine). A bf16 model's LayerNorm parameters and biases are handed over as fp32
        copies (the step's activations are fp32); its projections stay bf16."""
        c, t = self.config, self.transformer
        eps = {m.eps for b in t.h for m in (b.ln_1, b.ln_2)} | {t.ln_f.eps}
        if c.activation_function not in TANH_GELU or t.wte.weight.dtype not in NATIVE_WEIGHT_DTYPES or len(eps) != 1:
            return None
        layers = []
        for block, kv_cache in zip(t.h, kv_caches, strict=True):
            kv = LayerKVCache(*kv_cache)
            linears = [_native_weights(m) for m in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)]
            if any(lw is None for lw in linears) or kv.k.device.type != "cpu":
                return None
            layers.append(LayerWeights(_fp32(block.ln_1), _fp32(block.ln_2), *linears, kv.k, kv.v, block.attn.scale,
                                       kv.k_scales, kv.v_scales))
        return DecodeStepWeights(layers, _fp32(t.ln_f), eps.pop(), c.n_head, c.n_inner)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (N, vocab) of final hidden states (N, C). A bf16 LM head of a few rows goes to the C linear
        (fp32 logits: lmservice/kernels/cpu_policy.py's linear_bf16_rows), fp32 rows from the C decode step
        meet a bf16 head op by op in its dtype."""
        head = self.lm_head
        if isinstance(head, nn.Linear):
            if 0 < hidden.shape[0] <= self._kernels.linear_bf16_rows and head.weight.dtype == torch.bfloat16:
                return self._kernels.library.linear_bf16(hidden, head.weight, head.bias)
            hidden = hidden.to(head.weight.dtype)
        return _linear(head, "lm_head", hidden, None)  # (N, vocab)


NATIVE_WEIGHT_DTYPES = (torch.float32, torch.bfloat16)  # what the C decode step's projections read


def _fp32(norm: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """A LayerNorm's weight and bias in fp32 (the tensors themselves for an fp32 model, else copies)."""
    return norm.weight.float(), norm.bias.float()


def _native_weights(module: nn.Module) -> LinearWeights | None:
    """A projection's weights as the C decode step reads them: a quantized module says (native_weights);
    otherwise fp32 or bf16 (out, in) contiguous weights with an fp32 bias, or None."""
    export = getattr(module, "native_weights", None)
    if export is not None:
        return export()
    weight = module.weight
    if weight.dtype not in NATIVE_WEIGHT_DTYPES or weight.device.type != "cpu" or not weight.is_contiguous():
        return None
    return LinearWeights(weight, None if module.bias is None else module.bias.float())
