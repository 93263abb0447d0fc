"""The interpreter accepts code the GPU compiler rejects (loop-carried types, constexpr
globals, dot shapes), so every kernel is also compiled ahead of time for sm_90 (H100/H200)
to PTX and cubin. Compiling needs no GPU; it runs in a subprocess because this pytest
process has TRITON_INTERPRET=1 set, under which @triton.jit builds interpreter functions.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _compile_all() -> list[str]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lmservice.kernels import triton_activation, triton_attention, triton_kv_cache, triton_norm

    target = GPUTarget("cuda", 90, 32)
    paged = {"stride_qt": "i32", "stride_qh": "i32", "stride_ot": "i32", "stride_oh": "i32",
             "stride_cb": "i32", "stride_cr": "i32", "stride_ch": "i32", "stride_sb": "i32", "stride_sr": "i32",
             "stride_bt": "i32"}
    cases = []
    # (queries, KV cache): fp16 takes the bf16 path; narrow caches under bf16 and fp32 queries
    for dt, kv in (("bf16", "bf16"), ("fp32", "fp32"), ("bf16", "i8"), ("fp32", "fp16")):
        cases.append((f"prefill {dt} over {kv}", triton_attention._prefill_kernel, {
            "Q": f"*{dt}", "K_CACHE": f"*{kv}", "V_CACHE": f"*{kv}", "K_SCALES": "*fp32", "V_SCALES": "*fp32",
            "OUT": f"*{dt}", "CU_SEQLENS_Q": "*i32", "SEQ_LENS": "*i32", "BLOCK_TABLES": "*i32", "scale_log2": "fp32",
            **paged,
        }, {"BLOCK_SIZE": 16, "HEAD_DIM": 64, "BLOCK_M": 128, "BLOCK_N": 64, "UPCAST": False,
            "DOT_PRECISION": "ieee" if dt == "fp32" else "tf32", "IS_INT8": kv == "i8"}))
    for is_split, kv in ((False, "bf16"), (True, "bf16"), (False, "i8")):
        decode_sig = {"Q": "*bf16", "K_CACHE": f"*{kv}", "V_CACHE": f"*{kv}", "K_SCALES": "*fp32", "V_SCALES": "*fp32",
                      "OUT": "*bf16", "PART_OUT": "*fp32", "PART_LSE": "*fp32", "SEQ_LENS": "*i32",
                      "BLOCK_TABLES": "*i32", "scale_log2": "fp32",
                      **{k.replace("qt", "qs").replace("ot", "os"): v for k, v in paged.items()}}
        cases.append((f"decode split={is_split} over {kv}", triton_attention._decode_kernel,
                      {**decode_sig, "num_splits": "i32"},
                      {"IS_SPLIT": is_split, "BLOCK_SIZE": 16, "HEAD_DIM": 64, "BLOCK_N": 64, "IS_INT8": kv == "i8"}))
    cases.append(("decode merge", triton_attention._decode_merge_kernel,
                  {"OUT": "*bf16", "PART_OUT": "*fp32", "PART_LSE": "*fp32", "stride_os": "i32", "stride_oh": "i32",
                   "num_splits": "i32"}, {"BLOCK_S": 4, "HEAD_DIM": 64}))
    for kv in ("bf16", "fp16", "i8"):
        cases.append((f"write kv into {kv}", triton_kv_cache._write_kv_kernel, {
            "KEY": "*bf16", "VALUE": "*bf16", "K_CACHE": f"*{kv}", "V_CACHE": f"*{kv}", "K_SCALES": "*fp32",
            "V_SCALES": "*fp32", "SLOT_MAPPING": "*i64", "num_heads": "i32",
            **{f"stride_{s}": "i32" for s in ("kt", "kh", "vt", "vh", "cb", "cr", "ch", "sb", "sr")},
        }, {"BLOCK_SIZE": 16, "HEAD_DIM": 64, "BLOCK_H": 32, "IS_INT8": kv == "i8"}))
    cases.append(("add layer norm", triton_norm._add_layer_norm_kernel, {
        "X": "*bf16", "RESIDUAL": "*bf16", "WEIGHT": "*bf16", "BIAS": "*bf16", "OUT": "*bf16", "H": "*bf16",
        "n_cols": "i32", "eps": "fp32", **{f"stride_{s}": "i32" for s in ("x", "r", "o", "h")},
    }, {"HAS_RESIDUAL": True, "BLOCK_N": 2048}))
    cases.append(("bias gelu", triton_activation._bias_gelu_kernel, {
        "X": "*bf16", "BIAS": "*bf16", "OUT": "*bf16", "n_cols": "i32", "stride_x": "i32", "stride_o": "i32",
    }, {"HAS_BIAS": True, "BLOCK_N": 1024}))
    done = []
    for name, fn, sig, constexprs in cases:
        fn = fn.fn if isinstance(fn, triton.runtime.Autotuner) else fn  # autotuned where a GPU is present
        signature = {**sig, **dict.fromkeys(constexprs, "constexpr")}
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target)
        assert compiled.asm.get("cubin"), name
        done.append(name)
    return done


def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "compiled 13 kernels" in proc.stdout, proc.stdout


if __name__ == "__main__":
    print(f"compiled {len(_compile_all())} kernels")
