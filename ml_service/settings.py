"""Service settings: one pydantic-settings object, read from ML_SERVICE_* environment variables.

Nothing else in the service reads the environment; `get_settings()` builds the object on demand.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from lib.config import DEFAULT_CHECKPOINT


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ML_SERVICE_", env_file=None, extra="ignore")

    service: str = Field(
        "text-generation",
        description="model service to run, by name (see `python -m ml_service.runner list`)",
    )
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=1, le=65535, description="bind port")
    checkpoint: Path = Field(DEFAULT_CHECKPOINT, description="checkpoint directory to serve")
    random_preset: str | None = Field(
        None,
        description="serve a RANDOMLY INITIALISED preset instead of a checkpoint (baseline only)",
    )
    device: str = Field("cpu", description="torch device, e.g. cpu or cuda")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights dtype")
    max_batch_size: int = Field(
        64,
        ge=1,
        le=1024,
        description="most sequences the engine runs in one batch (1 disables batching)",
    )
    max_queue: int = Field(
        256, ge=1, description="most requests waiting for a batch row; more get 503 at once"
    )
    max_texts: int = Field(64, ge=1, le=4096, description="most texts in one /forward_batch")
    max_new_tokens_limit: int = Field(
        256, ge=1, description="largest max_new_tokens a request may ask"
    )
    max_text_chars: int = Field(8000, ge=1, description="longest text (characters) in one request")
    max_file_bytes: int = Field(256 * 1024, ge=1, description="largest uploaded text file (bytes)")
    batch_wait_ms: float = Field(
        2.0,
        ge=0,
        le=1000,
        description="how long the first request to an idle engine waits for company (ms)",
    )
    log_level: str = Field("info", description="log level of the service")


@lru_cache
def get_settings() -> Settings:
    return Settings()
