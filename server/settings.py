"""Service settings: every knob is a CLI flag of prefix-serve and a PREFIXSERVE_* environment variable."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PREFIXSERVE_", extra="ignore")

    model: str = Field(
        "models/demo-gpt2",
        description="local HF directory (save_pretrained): a GPT-2, Llama, Qwen2 or Mistral causal LM, "
        "or a BART seq2seq model",
    )
    store: str = Field("var/prefixes", description="directory, file://DIR, or redis://host:port/db")
    store_timeout: float = Field(
        2.0,
        gt=0,
        le=300,
        description="seconds a Redis call may wait (connect, each read) before the request answers 503 "
        "store_unavailable; while Redis does not answer, further calls fail at once and one at a time retries it",
    )
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when present")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="auto = float32 on CPU, bfloat16 on CUDA; token-exact parity with HF/PEFT holds in float32 only",
    )
    admin_key: str | None = Field(
        None, description="admin bearer key; unset = auth off (a warning is logged)"
    )

    max_num_seqs: int = Field(
        64, ge=1, description="sequences decoded together in one forward pass (KV slots)"
    )
    max_prefill_tokens: int = Field(4096, ge=1, description="prompt tokens prefilled in one step")
    max_model_len: int = Field(
        1024, ge=8, description="positions per sequence (prefix + prompt + output), capped by the model"
    )
    max_prefix_tokens: int = Field(
        256, ge=1, description="longest prefix (virtual tokens) accepted on upload"
    )
    max_queue: int = Field(
        1024,
        ge=1,
        description="requests waiting for a busy slot; when full, a tenant over its weighted share gets 429",
    )
    scheduling: Literal["fair", "fifo"] = Field(
        "fair",
        description="admission order: fair = least weighted service first (virtual token counter), "
        "fifo = arrival order with one global queue limit",
    )
    max_prefix_value: float = Field(
        1e4,
        gt=0,
        le=1e30,
        description="largest |value| accepted in an uploaded prefix (422 value_out_of_range beyond it)",
    )
    cache_bytes: int = Field(
        1 << 30,
        ge=0,
        description="prefix cache budget in bytes: resident prefixes on the device; with --kv-layout paged host "
        "copies only (a prefix's device copy is its blocks in the KV pool, under --kv-cache-bytes)",
    )
    kv_cache_bytes: int | None = Field(
        None,
        ge=0,
        description="KV cache budget in bytes; --max-num-seqs is capped to the sequences that fit. Default: 80% "
        "of the memory free after loading the model, less --cache-bytes (not with --kv-layout paged on CUDA: "
        "that cache is then on the host)",
    )
    kv_layout: Literal["slots", "paged"] = Field(
        "slots",
        description="slots: every sequence owns a whole slot of --max-model-len positions, its prefix copied in; "
        "paged: blocks of --kv-block-size positions taken as a sequence grows (a running request is preempted, "
        "then resumed, when they run out), and a prefix is stored once as shared read-only blocks (every family; BART's "
        "cross entries in the same blocks; decode steps as CUDA graphs on CUDA with --cuda-graphs, the block tables in "
        "fixed buffers (not yet run on a GPU), eager on CPU; with --runner-process the front's scheduler allots the "
        "blocks and the child holds them; see docs/design/kv-cache.md)",
    )
    kv_block_size: int = Field(16, ge=1, le=1024, description="positions per KV block with --kv-layout paged")
    cuda_graphs: bool = Field(
        True,
        description="on CUDA, replay decode steps (GPT-2, Llama, Qwen2, Mistral) as CUDA graphs (captured per batch/length bucket on "
        "first use), with either --kv-layout (paged: block tables, prefix lengths and offsets in fixed buffers, one block of "
        "--kv-cache-bytes kept for pad rows); false = launch every kernel eagerly. Prefill, BART and CPU always run eagerly",
    )
    runner_process: bool = Field(
        True,
        description="run the forward passes and the sampler in a child process (spawned; it loads the weights, "
        "this process keeps the tokenizer and the HTTP front), so the front's Python never holds the GIL they "
        "need: streaming to many clients or refusing a flood no longer slows the steps. Costs the child's start-up "
        "(importing torch, loading the model) and one message each way per step; false runs them in this "
        "process (cheaper only where a step is tiny, e.g. a 1-layer test model)",
    )
    overlap_steps: bool = Field(
        True,
        description="with --runner-process: schedule and send step k+1 while the child runs step k, and record step "
        "k's tokens meanwhile (the host's work per step hides behind the forward). A finishing sequence runs one "
        "step more than it needs (its token dropped) and its slot is taken a step later; beam groups are not "
        "overlapped. No effect without --runner-process",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="intra-op threads of the forward on the host (torch.set_num_threads), in this process and in "
        "--runner-process's child. Default: OMP_NUM_THREADS when set, else the CPUs this process may run on less "
        "one (at least 1), so that the HTTP front keeps a core and a flood it answers does not stall the steps",
    )
    retain_host_memory: bool = Field(
        True,
        description="keep freed host memory in the C allocator for the next step (glibc: mmap threshold 32 MiB, "
        "trim threshold 1 GiB) instead of page-faulting fresh pages for each step's tensors; resident memory "
        "stays near its high-water mark. Not applied when the C library is not glibc or MALLOC_* / "
        "GLIBC_TUNABLES set malloc in the environment",
    )
    drain_timeout: float = Field(
        30.0, ge=0, description="on SIGTERM, seconds running generations may take to finish before exit"
    )
    max_step_seconds: float = Field(
        60.0,
        gt=0,
        description="an engine step running longer than this makes /readyz report the loop stuck (503)",
    )
    stream_interval: int = Field(
        1,
        ge=1,
        le=1024,
        description="a stream's token events per write: 1 sends each at once; N sends the first at once, then "
        "N tokens' events a write (the rest at the end): fewer socket writes with many streams, events up to N-1 "
        "steps later",
    )
    log_format: Literal["text", "json"] = Field("text", description="text, or json: one JSON object per line")
    max_body_bytes: int = Field(
        64 << 20, ge=1024, description="largest request body (uploads), in bytes; over it: 413"
    )
    body_timeout: float = Field(
        60.0,
        gt=0,
        description="seconds a request's whole body may take to arrive, counted from its headers; a slower "
        "body is answered 408 body_timeout and its connection closed (a 64 MiB upload needs about 1.1 MB/s). "
        "The request line and headers (at most 64 KiB) get as long from their first byte: 408 head_timeout",
    )
    cors_origins: str = Field(
        "",
        description="browser origins allowed to call the API (CORS), comma-separated, e.g. "
        "https://app.example.com; * allows any origin; empty (the default) sends no CORS headers",
    )
    request_timeout: float = Field(
        300.0, gt=0, description="seconds a generation may take before it is aborted (504)"
    )
    key_grace_seconds: float = Field(
        600.0,
        ge=0,
        description="while the store is unreachable, tenant keys verified here this recently keep working, and "
        "prefixes resident in the device cache keep being served this long after the Redis change feed was lost",
    )
    replica_name: str | None = Field(None, description="sent as X-Prefixserve-Replica; default host:port")
    log_level: str = Field("info", description="python logging level")

    @field_validator("admin_key")
    @classmethod
    def _admin_key_not_blank(cls, value: str | None) -> str | None:
        # an empty PREFIXSERVE_ADMIN_KEY (e.g. `ADMIN_KEY=${UNSET}` in compose) is a mistake, not "auth off"
        if value is not None and not value.strip():
            raise ValueError(
                "PREFIXSERVE_ADMIN_KEY is set but blank; unset it to turn auth off, or set a long random key"
            )
        return value


@lru_cache
def get_settings() -> Settings:
    return Settings()
