"""Every knob of the service, read once from `PATCHPACK_*` env vars (or `serve` flags).

Nothing here is read at import time: `Settings()` is built by the CLI or by tests and passed
down. Defaults that depend on the device (`MAX_BATCH_TOKENS`, `MAX_QUEUE_TOKENS`) stay `None`
until `resolve()` knows whether CUDA is in use.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

GPU_MAX_BATCH_TOKENS = 16384
CPU_MAX_BATCH_TOKENS = 4096
QUEUE_TOKENS_PER_BATCH_TOKEN = 8

DTYPES = ("auto", "float32", "bfloat16", "float16")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PATCHPACK_", extra="ignore", frozen=True)

    model: str = Field(
        "demo:base", description="hub id, local checkpoint dir, or demo:tiny|base|so400m"
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto = bfloat16 on CUDA, float32 on CPU"
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_batch_tokens: int | None = Field(
        None, ge=1, description="patch tokens per forward pass (16384 on CUDA, 4096 on CPU)"
    )
    max_wait_ms: float = Field(5.0, ge=0, description="longest an image waits for a fuller batch")
    max_queue_tokens: int | None = Field(
        None, ge=1, description="admitted-but-unfinished tokens before 429 (8 x MAX_BATCH_TOKENS)"
    )
    default_token_budget: int = Field(256, ge=1)
    max_token_budget: int = Field(4096, ge=1)
    max_images_per_request: int = Field(64, ge=1)
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(100_000_000, ge=1)
    request_timeout_s: float = Field(60.0, gt=0)
    api_keys: str = Field("", description="comma-separated bearer keys; empty = no auth")
    allow_urls: bool = False
    url_timeout_s: float = Field(10.0, gt=0, description="per URL fetch, when ALLOW_URLS is on")
    preprocess_workers: int = Field(0, ge=0, description="decode/resize threads (0 = cpu count)")
    resize_device: Literal["auto", "cpu", "model"] = Field(
        "auto",
        description="where resize+patchify run: auto = on the model's device when it is CUDA "
        "(naflex/square), cpu = bit-exact CPU path, model = the model's device always",
    )
    attention: Literal["auto", "cuda-varlen", "flash-attn", "sdpa-segments", "dense-mask"] = "auto"
    torch_threads: int = Field(
        0, ge=0, description="intra-op threads for CPU compute (0 = torch's)"
    )
    warmup: bool = Field(True, description="run packed warm-up passes before /readyz turns 200")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError(f"DEVICE must be auto, cpu, cuda or cuda:N, not {value!r}")
        return value

    @model_validator(mode="after")
    def _check_invariants(self) -> Settings:
        if self.default_token_budget > self.max_token_budget:
            raise ValueError(
                f"DEFAULT_TOKEN_BUDGET ({self.default_token_budget}) exceeds "
                f"MAX_TOKEN_BUDGET ({self.max_token_budget})"
            )
        if self.max_batch_tokens is not None and self.max_token_budget > self.max_batch_tokens:
            raise ValueError(
                f"MAX_TOKEN_BUDGET ({self.max_token_budget}) exceeds MAX_BATCH_TOKENS "
                f"({self.max_batch_tokens}): one image could never fit in a forward pass"
            )
        if (
            self.max_batch_tokens is not None
            and self.max_queue_tokens is not None
            and self.max_queue_tokens < self.max_batch_tokens
        ):
            raise ValueError(
                f"MAX_QUEUE_TOKENS ({self.max_queue_tokens}) is below MAX_BATCH_TOKENS "
                f"({self.max_batch_tokens}): batches could never fill"
            )
        return self

    @property
    def api_key_list(self) -> tuple[str, ...]:
        return tuple(k.strip() for k in self.api_keys.split(",") if k.strip())

    def resolve(self, cuda: bool) -> Settings:
        """Fill the device-dependent defaults and re-validate the invariants."""
        batch = self.max_batch_tokens or (GPU_MAX_BATCH_TOKENS if cuda else CPU_MAX_BATCH_TOKENS)
        queue = self.max_queue_tokens or QUEUE_TOKENS_PER_BATCH_TOKEN * batch
        values = self.model_dump()
        values.update(max_batch_tokens=batch, max_queue_tokens=queue)
        # model_validate, not the constructor: the resolved copy must not re-read the env.
        return Settings.model_validate(values)

    @property
    def batch_tokens(self) -> int:
        if self.max_batch_tokens is None:
            raise RuntimeError("Settings.resolve() has not run")
        return self.max_batch_tokens

    @property
    def queue_tokens(self) -> int:
        if self.max_queue_tokens is None:
            raise RuntimeError("Settings.resolve() has not run")
        return self.max_queue_tokens
