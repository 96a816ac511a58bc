"""Service settings: one pydantic-settings object, read from ML_SERVICE_* environment variables.

Nothing else in the service reads the environment; `get_settings()` builds the object on demand.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from lib.inference.adapter_names import find_adapters
from lib.inference.limits import (
    ADAPTER_MB,
    ENGINE_MAX_BATCH_SIZE,
    ENGINE_MAX_QUEUE,
    ENGINE_MAX_WAIT_S,
    PREFIX_CACHE_MB,
)
from lib.inference.registry import ENGINES, EngineSpec, LoadSpec, check_quantization
from lib.presets import DEFAULT_CHECKPOINT

log = logging.getLogger("ml_service")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ML_SERVICE_", env_file=None, extra="ignore")

    service: str = Field(
        "text-generation",
        description="model service to run, by name (see `python -m ml_service.runner list`)",
    )
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=1, le=65535, description="bind port")
    checkpoint: Path = Field(DEFAULT_CHECKPOINT, description="checkpoint directory to serve")
    models_dir: Path | None = Field(
        None,
        description="a directory of model versions (one checkpoint per subdirectory); when set, "
        "it is served instead of `checkpoint`, and /admin/reload switches versions",
    )
    model_version: str | None = Field(
        None, description="the version (subdirectory of models_dir) to serve; default: the last"
    )
    traffic: str | None = Field(
        None,
        description="A/B split between versions of models_dir, e.g. '2026-11-20=90,2026-11-28=10' "
        "(weights; every version named is loaded); each client sticks to one version; "
        "POST /admin/traffic changes it at run time; unset: the default version serves all",
    )
    shadow_version: str | None = Field(
        None,
        description="a version of models_dir that receives a copy of /forward and /forward_batch "
        "traffic; its answers are discarded (only its metrics are kept), it never delays a client",
    )
    served_model_name: str | None = Field(
        None,
        description="the model's name on the OpenAI routes (vLLM's --served-model-name): "
        "/v1/models lists it first, requests may name it and answers carry it as `model`; the "
        "checkpoint's model id (and a version's name) stay accepted; unset: the model id",
    )
    random_preset: str | None = Field(
        None,
        description="serve a RANDOMLY INITIALISED preset instead of a checkpoint (baseline only)",
    )
    device: str = Field("cpu", description="torch device, e.g. cpu or cuda")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights dtype")
    engine: str = Field(
        "process",
        description="what generates text, one of lib.inference.ENGINES: "
        + ENGINES.describe(generates=True),
    )
    backend: Literal["auto", "torch", "onnxruntime"] = Field(
        "auto",
        description="what runs the model under our engine: torch, or ONNX Runtime over the "
        "checkpoint's ONNX export (`make export-onnx`; CPU, fp32 or int8); auto: torch, except for "
        "a directory that only has an ONNX model",
    )
    quantization: Literal["none", "int8"] = Field(
        "none",
        # ML_SERVICE_ONNX_PRECISION (fp32/int8) is its former name, still read
        validation_alias=AliasChoices(
            "ML_SERVICE_QUANTIZATION", "ML_SERVICE_ONNX_PRECISION", "quantization"
        ),
        description="the weights' serving precision on CPUs: int8 (one scale per output channel, "
        "activations quantized per token at each step) for the torch backend, or the int8 ONNX "
        "file (model.int8.onnx, `make export-onnx INT8=1`) for onnxruntime; none: the checkpoint "
        "as it is (dtype). Formerly ML_SERVICE_ONNX_PRECISION (fp32 means none)",
    )
    tensor_parallel: int = Field(
        1,
        ge=1,
        description="GPUs one model is split across (vLLM's tensor_parallel_size; vllm only)",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        # the service's own variable, else torch's usual knob (read here, at the edge)
        validation_alias=AliasChoices(
            "ML_SERVICE_TORCH_THREADS", "OMP_NUM_THREADS", "torch_threads"
        ),
        description="CPU threads for the model's math (torch.set_num_threads on the engine's "
        "thread); default: OMP_NUM_THREADS if set, else, for a model of 10 M parameters or more, "
        "every core the process may use, and for a smaller one all but one, left to the HTTP "
        "side (both measured best on 2 cores)",
    )
    engine_standby: bool = Field(
        True,
        description="the process engine keeps one spare process, its imports done, that replaces "
        "a crashed engine in well under a second (a new one takes seconds); it costs ~260 MB of "
        "memory; false: a crashed engine is replaced by a new process",
    )
    max_batch_size: int = Field(
        ENGINE_MAX_BATCH_SIZE,
        ge=1,
        le=1024,
        description="most sequences the engine runs in one batch (1 disables batching)",
    )
    prefix_cache_mb: int = Field(
        PREFIX_CACHE_MB,
        ge=0,
        description="memory (MiB) for the keys and values of prompt prefixes kept after their "
        "requests end (blocks of 16 tokens, least recently used evicted): a prompt that begins "
        "like an earlier one (a system prompt, earlier chat turns) runs only the rest; 0: off. "
        "Our engines on the torch backend; vLLM: its own prefix caching, on unless 0",
    )
    adapters_dir: Path | None = Field(
        None,
        description="a directory of LoRA adapters: each subdirectory holding adapter_config.json "
        "(a PEFT LoRA directory, as `train_distributed.py --lora-rank` writes) is loaded at start "
        "as the adapter named after it (model `<model>:<name>` on /v1, `adapter` on /forward), "
        "and read again by each reload; a subdirectory whose name cannot name an adapter (1-64 "
        "letters, digits, '.', '_' or '-') stops the start. POST /admin/adapters adds more",
    )
    max_adapter_mb: int = Field(
        ADAPTER_MB,
        ge=0,
        description="memory (MiB) for loaded LoRA adapters; past it the least recently used one "
        "not serving a request is unloaded to make room; 0: no adapters",
    )
    max_queue: int = Field(
        ENGINE_MAX_QUEUE,
        ge=1,
        description="most requests waiting for a batch row; more get 503 at once",
    )
    max_texts: int = Field(64, ge=1, le=4096, description="most texts in one /forward_batch")
    max_new_tokens_limit: int = Field(
        256, ge=1, description="largest max_new_tokens a request may ask"
    )
    max_text_chars: int = Field(8000, ge=1, description="longest text (characters) in one request")
    max_file_bytes: int = Field(256 * 1024, ge=1, description="largest uploaded text file (bytes)")
    batch_wait_ms: float = Field(
        ENGINE_MAX_WAIT_S * 1000,
        ge=0,
        le=1000,
        description="how long the first request to an idle engine waits for company (ms); "
        "0: start at once (with continuous batching, later requests join at the next step)",
    )
    request_timeout_s: float = Field(
        120.0, gt=0, description="a generation still running after this long gets 504"
    )
    max_body_bytes: int = Field(
        1024 * 1024, ge=1, description="largest request body (bytes); larger ones get 413"
    )
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="comma-separated keys; when set, /forward and /forward_batch need "
        "`Authorization: Bearer KEY`",
    )
    admin_token: SecretStr | None = Field(
        None, description="token for /admin/* (`Authorization: Bearer TOKEN`); unset: disabled"
    )
    rate_limit: str | None = Field(
        None,
        description="requests per API key (or client address without keys), e.g. '60/minute' or "
        "'10/second;200/hour', counted across the fleet with redis_url (per replica without it, "
        "or while Redis is down); unset: no limit",
    )
    auth_failure_limit: str | None = Field(
        "20/minute",
        description="failed authentications (a wrong API key or admin token) allowed per client "
        "address, e.g. '20/minute'; past it the address gets 429 with Retry-After, even with a "
        "correct key, until the window frees up; empty: no limit",
    )
    guard_info_routes: bool = Field(
        False,
        description="with API keys set, also require a key for /metadata, /metrics, /docs, "
        "/redoc and /openapi.json (/health and /ready stay open)",
    )
    max_header_bytes: int = Field(
        32 * 1024,
        ge=1024,
        description="largest total size of the request headers (bytes); larger ones get 431",
    )
    keep_alive_timeout_s: int = Field(
        5,
        ge=1,
        le=3600,
        description="close a keep-alive connection that has sent no new request for this many "
        "seconds (uvicorn's timeout_keep_alive)",
    )
    request_read_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="a connection must deliver a whole request (headers and body) within this "
        "many seconds of its first byte, and a new connection its first request within this "
        "long; slower ones are closed (slow-header and slow-body clients)",
    )
    max_connections: int | None = Field(
        1024,
        ge=1,
        description="most connections (a new request's own included) or requests open at once "
        "(uvicorn's limit_concurrency); a request past it gets a JSON 503 with Retry-After at "
        "once; unset: no limit",
    )
    shutdown_grace_s: float = Field(
        30.0, ge=0, description="on SIGTERM, how long in-flight requests may take to finish"
    )
    background_load: bool = Field(
        True,
        description="load the model after the server starts (/health answers, /ready is 503 "
        "until it is loaded and warmed up); false: load before accepting connections",
    )
    redis_url: str | None = Field(
        None,
        description="the fleet's shared Redis, e.g. redis://redis:6379/0: rate limits, the "
        "response cache and A/B assignments are shared by every replica; unset: each replica "
        "keeps them in memory. Redis down or slow: each replica falls back to memory and serves on",
    )
    redis_secret: SecretStr | None = Field(
        None,
        description="a secret every replica shares: the Redis keys made from API keys and "
        "client addresses are HMACs under it, so whoever reads Redis learns neither; unset with "
        "redis_url: a warning at start",
    )
    redis_timeout_ms: float = Field(
        50.0, gt=0, le=10_000, description="the longest any Redis call may take before falling back"
    )
    cache_ttl_s: float = Field(
        600.0,
        ge=0,
        description="how long a cached response lives (greedy or seeded requests only); 0: no cache",
    )
    cache_max_entries: int = Field(
        10_000,
        ge=1,
        description="most responses the in-memory cache holds (least recently used go)",
    )
    log_prompts: bool = Field(False, description="write prompt texts into the access log")
    log_level: str = Field("info", description="log level of the service")

    @property
    def batch_wait_s(self) -> float:
        """`batch_wait_ms` in seconds, as the engines take it."""
        return self.batch_wait_ms / 1000

    def engine_spec(self) -> EngineSpec:
        """What the settings ask an engine to load and how to batch it: every engine (in this
        process, in its own, or vLLM) is built from this one spec."""
        load = LoadSpec(
            checkpoint=str(self.checkpoint),
            random_preset=self.random_preset,
            device=self.device,
            dtype=self.dtype,
            backend=self.backend,
            quantization=self.quantization,
            threads=self.torch_threads,
        )
        return EngineSpec(
            load=load,
            max_batch_size=self.max_batch_size,
            max_wait_s=self.batch_wait_s,
            max_queue=self.max_queue,
            threads=self.torch_threads,
            tensor_parallel=self.tensor_parallel,
            standby=self.engine_standby,
            prefix_cache_mb=self.prefix_cache_mb,
            adapters=self.directory_adapters(),
            adapter_mb=self.max_adapter_mb,
        )

    def directory_adapters(self) -> tuple[tuple[str, str], ...]:
        """(name, path) of the adapters in `adapters_dir`, read now (a reload reads it again); a
        subdirectory with a bad name added since the start is left out, with a warning."""
        if self.adapters_dir is None or self.max_adapter_mb == 0:
            return ()
        found, problems = find_adapters(self.adapters_dir)
        for problem in problems:
            log.warning("adapter not loaded: %s", problem)
        return tuple(found)

    @field_validator("engine")
    @classmethod
    def _registered_engine(cls, v: str) -> str:
        choices = ENGINES.names(generates=True)
        if v not in choices:
            raise ValueError(f"engine must be one of {', '.join(choices)}, not {v!r}")
        return v

    @model_validator(mode="after")
    def _backend_fits_engine(self):
        if self.backend == "onnxruntime" and not ENGINES[self.engine].capabilities.runs_backends:
            raise ValueError(
                "ML_SERVICE_BACKEND=onnxruntime runs under our engine (ML_SERVICE_ENGINE=process "
                f"or thread); {self.engine} runs its own model"
            )
        return self

    @model_validator(mode="after")
    def _adapters_servable(self):
        if self.adapters_dir is None:
            return self
        if not self.adapters_dir.is_dir():
            raise ValueError(f"ML_SERVICE_ADAPTERS_DIR {self.adapters_dir} is not a directory")
        if self.max_adapter_mb == 0:
            raise ValueError("ML_SERVICE_ADAPTERS_DIR needs ML_SERVICE_MAX_ADAPTER_MB above 0")
        if not ENGINES[self.engine].capabilities.adapters or self.backend == "onnxruntime":
            raise ValueError(
                f"ML_SERVICE_ADAPTERS_DIR: the {self.engine} engine on the {self.backend} backend "
                "serves no adapters (our engines on torch do)"
            )
        _, problems = find_adapters(self.adapters_dir)
        if problems:
            raise ValueError("ML_SERVICE_ADAPTERS_DIR: " + "; ".join(problems))
        return self

    @field_validator("quantization", mode="before")
    @classmethod
    def _former_precision(cls, v):
        return "none" if v == "fp32" else v  # ML_SERVICE_ONNX_PRECISION's name for none

    @model_validator(mode="after")
    def _quantization_fits(self):
        if self.quantization == "none" or self.backend == "onnxruntime":
            return self
        if not ENGINES[self.engine].capabilities.runs_backends:
            raise ValueError(
                f"ML_SERVICE_QUANTIZATION=int8 runs under our engine (process or thread); "
                f"{self.engine} loads its own model (serve a checkpoint quantized in its format)"
            )
        check_quantization(self.quantization, self.device, self.dtype)  # CPU and float32
        return self

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v):
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v

    @field_validator("traffic")
    @classmethod
    def _parse_traffic(cls, v: str | None) -> str | None:
        if v:
            from ml_service.traffic import TrafficSplit

            TrafficSplit.parse(v)  # raises BadSplit (a ValueError) saying what is wrong
        return v or None

    @field_validator("redis_secret", mode="before")
    @classmethod
    def _empty_secret(cls, v):
        return None if v == "" else v  # an empty variable (compose's default) is no secret

    @field_validator("served_model_name")
    @classmethod
    def _strip_name(cls, v: str | None) -> str | None:
        return (v or "").strip() or None

    @field_validator("rate_limit", "auth_failure_limit")
    @classmethod
    def _parse_rate(cls, v: str | None) -> str | None:
        if v:
            from limits import parse_many

            parse_many(v)  # raises ValueError with the reason for a malformed limit
        return v or None


@lru_cache
def get_settings() -> Settings:
    return Settings()
