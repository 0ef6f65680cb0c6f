"""Service settings: defaults here, overridden by ``ALEXNET_*`` environment variables, then by CLI flags.

Every field below is in docs/serving.md's settings table, which scripts/docs_tables.py generates from them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import model

ENV_PREFIX = "ALEXNET_"

LogLevel = Literal["debug", "info", "warning", "error", "critical"]
LogFormat = Literal["json", "text"]


# The batching defaults when the service runs on a GPU. 16 inputs and 100 ms were chosen on CPUs, where a
# forward pass of 16 takes ~100 ms; a GPU runs 128 in a few ms, so a batch may be larger and wait far less.
# These numbers are not yet measured on a GPU: bench/gpu_check.py's sweep of ALEXNET_MAX_BATCH and
# ALEXNET_MAX_WAIT_MS measures them (BENCHMARKS.md, "GPU acceptance run").
GPU_DEFAULTS = {"max_batch": 128, "max_wait_ms": 10.0}


def serves_on_cuda(device: object) -> bool:
    """Whether a ``device`` setting ends up on a GPU ("auto" does when CUDA is available)."""
    spec = str(device).strip().lower()
    if spec == "auto":
        import torch

        return torch.cuda.is_available()
    return spec.startswith("cuda")


class SettingsError(ValueError):
    """A setting that cannot be used; the message names the variable and the problem."""


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="interface to listen on (0.0.0.0 for every interface)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    grpc_port: int = Field(
        8001, ge=0, le=65535, description="TCP port of the gRPC inference service (as Triton's); 0 turns gRPC off"
    )
    checkpoint: Path = Field(
        Path("checkpoints/best.safetensors"),
        description="checkpoint to serve; training writes DIR/best.safetensors. Missing at the default path: an "
        "untrained net; missing where given: exit 3",
    )
    device: str = Field(
        "auto", description="auto (cuda if available, else cpu), cpu, cuda, cuda:N, or cuda:0,cuda:1 (two towers)"
    )
    max_batch: int = Field(
        16, ge=1, le=4096, description="most network inputs (images × crops) in one forward (GPU: 128)"
    )
    max_wait_ms: float = Field(
        100.0,
        ge=0,
        le=10_000,
        description="how long a batch may wait for more requests when recent load says "
        "they are coming (a lone client never waits; GPU: 10)",
    )
    queue_size: int = Field(64, ge=1, description="requests admitted at once (body to answer); more → 503")
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1, description="request body limit, counted while streaming")
    body_memory_bytes: int = Field(
        192 * 1024 * 1024,
        ge=1,
        description="bytes of request bodies held at once, all requests together; no room → 503 + Retry-After",
    )
    decode_memory_bytes: int = Field(
        640 * 1024 * 1024,
        ge=1,
        description="bytes that image decodes in flight may use, each bounded from its header before decoding; "
        "decodes wait for room; an image that needs more → 413",
    )
    max_pixels: int = Field(64_000_000, ge=1, description="width × height limit per image, read from its header")
    max_files: int = Field(16, ge=1, description="file parts per multipart request")
    body_timeout_s: float = Field(
        60.0, gt=0, description="seconds a request's body may take to arrive; slower → 408 (frees its queue place)"
    )
    threads: int = Field(0, ge=0, description="torch threads for inference; 0: one per CPU core")
    decode_workers: int = Field(0, ge=0, description="threads decoding images; 0: one per CPU core")
    explain_concurrency: int = Field(
        1,
        ge=1,
        le=64,
        description="Grad-CAM requests (/explain) computed at once, each in its own thread (not the inference "
        "thread); more → 503 + Retry-After",
    )
    reload_interval_s: float = Field(2.0, ge=0, description="checkpoint file poll interval; 0 turns hot reload off")
    log_level: LogLevel = Field("info", description="debug, info, warning, error or critical")
    log_format: LogFormat = Field(
        "json", description="json: one JSON object a line, for log collectors; text: plain lines, for a terminal"
    )

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lowercase(cls, value):
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="before")
    @classmethod
    def _gpu_defaults(cls, values):
        """On a GPU, the batching defaults of GPU_DEFAULTS where max_batch / max_wait_ms are not given."""
        if isinstance(values, dict) and serves_on_cuda(values.get("device", "auto")):
            return {**GPU_DEFAULTS, **values}
        return values

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        model.parse_devices(value)  # raises ValueError with the reason
        return value

    @model_validator(mode="after")
    def _bodies_fit_their_budget(self) -> Settings:
        if self.max_body_bytes > self.body_memory_bytes:
            raise ValueError(
                f"max_body_bytes ({self.max_body_bytes:,}) is more than body_memory_bytes ({self.body_memory_bytes:,}):"
                " a body of the allowed size could never be held"
            )
        return self

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, **overrides) -> Settings:
        """Defaults ← ``ALEXNET_<FIELD>`` variables ← ``overrides`` (CLI flags; None means not given)."""
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        sources: dict[str, str] = {}
        for name in cls.model_fields:
            variable = ENV_PREFIX + name.upper()
            if variable in environ:
                values[name], sources[name] = environ[variable], variable
        for name, value in overrides.items():
            if value is not None:
                values[name], sources[name] = value, "--" + name.replace("_", "-")
        try:
            return cls(**values)
        except ValidationError as e:
            problems = [_describe(err, sources) for err in e.errors()]
            raise SettingsError("invalid settings: " + "; ".join(problems)) from None

    @property
    def checkpoint_given(self) -> bool:
        """Whether the checkpoint path was given (flag or variable): then a missing file is an error, not the
        untrained fallback, which only the default path has."""
        return "checkpoint" in self.model_fields_set

    @property
    def cpu_count(self) -> int:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

    # The fields keep the names users set (ALEXNET_THREADS, --decode-workers); these say what 0 comes to.
    @property
    def thread_count(self) -> int:
        """``threads``, resolved: the torch threads of the inference thread (and of each explain thread)."""
        return self.threads or self.cpu_count

    @property
    def decode_worker_count(self) -> int:
        """``decode_workers``, resolved: the image decoding threads."""
        return self.decode_workers or self.cpu_count


def _describe(error: dict, sources: dict[str, str]) -> str:
    if not error["loc"]:  # a rule across fields: its message names them
        return error["msg"].removeprefix("Value error, ")
    name = str(error["loc"][0])
    return f"{sources.get(name, name)}: {error['msg']}"

