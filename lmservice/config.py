"""The one settings object of the server, read once at the composition root.

Every field is both an environment variable (`LMSERVICE_<FIELD>`) and a CLI
flag of `lmservice serve` (`--field-name`); flags win over the environment.
Nothing below the CLI reads the environment.

Engine settings take their defaults from the engine's own configs (EngineConfig,
SchedulerConfig, RequestLimits) under the same names: every default is written
once, there. lmservice/serving/bootstrap.py maps the fields across by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from lmservice.engine.config import EngineConfig
from lmservice.engine.sampling_params import RequestLimits
from lmservice.engine.scheduler import SchedulerConfig
from lmservice.engine.speculative import SpeculativeConfig

# The shipped default model, made by the project's own training jobs.
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "base"
DEFAULT_ADAPTERS_DIR = REPO_ROOT / "models"


class Settings(BaseSettings):
    """Validated configuration of one lmservice process (one base model on one device)."""

    model_config = SettingsConfigDict(env_prefix="LMSERVICE_", env_parse_none_str="", extra="forbid")

    # --- model ---
    model: Path = Field(DEFAULT_MODEL_DIR, description="Base model directory (Hugging Face GPT-2-family checkpoint).")
    served_model_name: str | None = Field(None, description="Name of the base model in the API (default: the directory name).")
    adapter: list[str] = Field(default_factory=list, description="LoRA adapter as NAME=DIR (repeatable).")
    adapters_dir: Path | None = Field(None, description="Directory whose PEFT adapter sub-directories are all served; also the only place POST /v1/adapters may load from.")
    max_adapter_path_chars: int = Field(1024, ge=1, description="Longest adapter path POST /v1/adapters accepts (checked before the file system is touched).")
    max_loras: int = Field(SchedulerConfig.max_loras, ge=1, description="Adapters resident on the device at once (and distinct adapters in one batch).")
    max_lora_rank: int = Field(EngineConfig.max_lora_rank, ge=1, description="Largest LoRA rank accepted.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Device to run on (auto: cuda when available).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Weights and activations dtype (auto: bfloat16 on CUDA and on CPUs with AMX bf16 tiles, float32 on other CPUs).")
    quantization: Literal["none", "int8", "int4"] = Field("none", description="int8: 8-bit weights with per-channel scales and dynamically quantized activations, quantized at start-up from any checkpoint (CPU only; float32 activations). int4: 4-bit weights in blocks of 32 with an fp16 scale each (like llama.cpp's q4_0; the LM head int8), otherwise the same.")
    threads: int = Field(0, ge=0, description="CPU threads of the model's matmuls and attention (torch/OpenMP); 0: torch's default, one per core. On a 2-core machine --quantization int8 served faster with 1 (docs/benchmarks.md).")
    linear_backend: Literal["auto", "torch", "onednn"] = Field("auto", description="How float32 projections run on a CPU: torch (its BLAS, MKL on x86) or onednn (oneDNN's matmul; 1.5-2.7x faster than MKL on AMD CPUs, 1.1-2x on an Intel Xeon). auto: onednn on x86 CPUs, torch elsewhere.")
    attention_backend: Literal["auto", "torch", "native", "triton"] = Field(EngineConfig.attention_backend, description="Kernels: triton on CUDA; on CPUs torch ops, with the C kernels built at install as --cpu-kernels decides (torch here implies --cpu-kernels torch, native implies native).")
    cpu_kernels: Literal["auto", "native", "torch"] = Field(EngineConfig.cpu_kernels, description="Whether the native C kernels run on a CPU (decode attention on the paged cache, linears for a few rows, the whole decode step in one call; float32 models; built when the package is installed, the best build this CPU runs chosen at start-up). auto: where they are built; native: required (start-up fails without them); torch: never (torch ops only). attention_backend torch implies torch, native implies native.")
    enable_cuda_graphs: bool = Field(EngineConfig.enable_cuda_graphs, description="Capture decode steps as CUDA graphs (CUDA only).")
    seed: int = Field(EngineConfig.seed, description="Seed of the sampler for requests that carry none.")

    # --- engine ---
    block_size: int = Field(EngineConfig.block_size, ge=1, description="Tokens per KV-cache block.")
    kv_cache_memory_mb: int = Field(EngineConfig.kv_cache_memory_mb, ge=1, description="Memory budget of the KV-cache block pool, in MiB.")
    kv_cache_dtype: Literal["auto", "fp32", "fp16", "bf16", "int8"] = Field(EngineConfig.kv_cache_dtype, description="How the KV cache stores K and V: fp16 or bf16 (half the memory of fp32, so twice the blocks for --kv-cache-memory-mb), or int8 with a float32 scale per token and head (about a quarter); widened to float32 inside the attention kernels. auto: int8 for --quantization int8 or int4, else the model's dtype.")
    num_kv_blocks: int | None = Field(EngineConfig.num_kv_blocks, ge=1, description="Exact number of KV blocks (overrides the memory budget).")
    max_num_batched_tokens: int = Field(SchedulerConfig.max_num_batched_tokens, ge=1, description="Token budget of one engine step (prefill chunks + decodes).")
    max_num_seqs: int = Field(SchedulerConfig.max_num_seqs, ge=1, description="Most requests running in one engine step.")
    enable_prefix_caching: bool = Field(EngineConfig.enable_prefix_caching, description="Reuse KV blocks of identical prompt prefixes across requests.")
    max_waiting_requests: int = Field(SchedulerConfig.max_waiting_requests, ge=1, description="Waiting-queue bound; past it requests get 429.")
    max_waiting_tokens: int = Field(SchedulerConfig.max_waiting_tokens, ge=1, description="Bound on prompt tokens waiting; past it requests get 429.")
    speculative: str | None = Field(EngineConfig.speculative, description="Speculative decoding: ngram (guesses from the sequence's own earlier tokens: prompt lookup) or draft:DIR (a small model with the base's tokenizer guesses); unset: off. Output is the same as without it (greedy and seeded) or from the same distribution (sampled).")
    num_speculative_tokens: int = Field(EngineConfig.num_speculative_tokens, ge=1, le=16, description="Tokens guessed per sequence per step (--speculative).")
    speculative_ngram_min: int = Field(EngineConfig.speculative_ngram_min, ge=1, description="Shortest run of last tokens that n-gram lookup matches.")
    speculative_ngram_max: int = Field(EngineConfig.speculative_ngram_max, ge=1, description="Longest run of last tokens that n-gram lookup matches (tried first).")
    speculative_disable_batch_size: int = Field(EngineConfig.speculative_disable_batch_size, ge=0, description="No guessing in a step with more decoding sequences than this: a large batch is no longer bound by reading the weights, and checking guesses costs more than they save.")

    # --- request limits (400 beyond each, naming the limit) ---
    max_n: int = Field(RequestLimits.max_n, ge=1, description="Most sequences one request may ask for (n).")
    max_logit_bias: int = Field(RequestLimits.max_logit_bias, ge=0, description="Most logit_bias entries in one request.")
    max_stop: int = Field(RequestLimits.max_stop, ge=0, description="Most stop strings (and, separately, stop token ids) in one request.")
    max_stop_length: int = Field(RequestLimits.max_stop_length, ge=1, description="Most characters in one stop string.")
    max_structured_spec_bytes: int = Field(65536, ge=1, description="Largest JSON schema, regex, choice list or grammar one request may constrain its output with (compiling is bounded by its size).")
    max_prompts_per_request: int = Field(256, ge=1, description="Most prompts (or texts) in one completions, classify or translate request.")

    # --- http ---
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind.")
    api_key: list[str] = Field(default_factory=list, description="Accepted API keys (Authorization: Bearer); none means no auth.")
    admin_key: str | None = Field(None, description="Key for the admin endpoints (POST/DELETE /v1/adapters); unset disables them.")
    auth_probes: bool = Field(False, description="Require an API key for /health, /ready and /metrics too.")
    max_body_bytes: int = Field(1_048_576, ge=1, description="Largest request body accepted (413 beyond).")
    cors_origins: list[str] = Field(default_factory=list, description="Origins allowed by CORS (none: CORS off).")
    drain_timeout_s: float = Field(30.0, ge=0, description="On SIGTERM, how long in-flight requests may finish.")
    header_read_timeout_s: float = Field(10.0, gt=0, description="A connection that has not sent its request headers this long after opening (or after starting its next request) is closed.")
    body_read_timeout_s: float = Field(30.0, gt=0, description="A request whose body has not fully arrived this long after its headers gets 408 and its connection is closed.")
    max_header_line_bytes: int = Field(8192, ge=64, description="Longest request line or header line (414 for the request line, 431 for a header; the connection is closed).")
    max_header_bytes: int = Field(65536, ge=64, description="Largest request head, request line and headers together (431; the connection is closed).")
    max_headers: int = Field(100, ge=1, description="Most header fields in one request (431; the connection is closed).")
    log_prompts: bool = Field(False, description="Log prompts and outputs (off: never logged).")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    playground: bool = Field(True, description="Serve the web playground and live dashboard at / (a page that calls the API with the user's key).")

    # --- tracing (OpenTelemetry; the otel extra) ---
    otlp_traces_endpoint: str | None = Field(None, description="Send a span per generating request to this OTLP/HTTP traces URL (e.g. http://collector:4318/v1/traces); unset: tracing off. The OTEL_* variables (service name, headers, sampler, batching) apply. Needs the otel extra: pip install 'lmservice[otel]'.")
    otlp_trace_prompts: bool = Field(False, description="Put prompts and outputs in the spans (off: never traced).")

    @field_validator("otlp_traces_endpoint")
    @classmethod
    def _check_otlp_endpoint(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"otlp_traces_endpoint {value!r} must be an http:// or https:// URL (OTLP over HTTP)")
        return value

    @model_validator(mode="after")
    def _check_speculative(self) -> Settings:
        """The speculative-decoding flags, checked before any model loads (ValueError naming the flag)."""
        SpeculativeConfig.parse(self.speculative, num_speculative_tokens=self.num_speculative_tokens,
                                ngram_min=self.speculative_ngram_min, ngram_max=self.speculative_ngram_max,
                                disable_batch_size=self.speculative_disable_batch_size)
        return self

    @field_validator("adapter")
    @classmethod
    def _check_adapter(cls, value: list[str]) -> list[str]:
        for item in value:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"adapter {item!r} must be NAME=DIR")
        return value

    def adapter_dirs(self) -> dict[str, Path]:
        return {name: Path(path) for name, _, path in (a.partition("=") for a in self.adapter)}
