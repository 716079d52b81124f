"""Settings: one object, read from `TUNEHOUSE_*` environment variables and CLI flags.

Built by callers (the CLI, tests), never at import time, so every test gets its own home.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

GIB = 1 << 30


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNEHOUSE_", extra="ignore")

    home: Path = Field(Path("~/.tunehouse"), description="Folder holding the database, blobs, keys and model cache.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default an SQLite file in the home (WAL mode). "
                                     "Several machines: `postgresql+psycopg://user:password@host/db`.")
    database_pool_size: int | None = Field(None, ge=1, description="Connections each process keeps open; default 20 "
                                           "on SQLite, 10 on PostgreSQL.")
    database_max_overflow: int | None = Field(None, ge=0, description="Connections a process may open beyond "
                                              "those under load; default 80 on SQLite, 20 on PostgreSQL.")
    database_auto_upgrade: bool = Field(True, description="Upgrade the schema when a process starts; false: refuse "
                                        "to start until `tunehouse db upgrade` has been run.")
    secret: SecretStr | None = Field(None, description="Server secret (signs upload URLs, seals job keys), at least "
                                     "32 characters; default `secret.key` in the home, made on first start. Give "
                                     "every API server and worker the same one.")
    admin_key: SecretStr | None = Field(None, description="An admin API key made sure of at start (no `admin.key` "
                                        "file is written); default: the first `serve` mints one into the home.")
    blob_dir: Path | None = Field(None, description="Blob store folder; default `blobs/` in the home. "
                                  "Ignored when `blob_url` is set.")
    blob_url: str | None = Field(
        None, pattern=r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/\S*)?|file://\S+|/\S*)$",
        description="Where blobs live: `s3://bucket/prefix` for any S3-compatible store (endpoint and "
                    "credentials from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                    "AWS_DEFAULT_REGION), or a local folder. Default: `blob_dir`.")
    blob_cache_dir: Path | None = Field(None, description="Local copies of remote blobs (datasets, checkpoints, "
                                        "weights) a worker or server reads; default `cache/` in the home.")
    blob_cache_gb: float = Field(50, gt=0, description="Size bound of the blob cache, GiB; the least recently "
                                 "used copies are evicted beyond it.")
    public_url: str | None = Field(
        None, pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$",
        description="Base URL clients reach this server at; upload URLs use it. Default: the address the "
                    "request reached (never its Host header, which the client writes).")
    model_cache: Path | None = Field(
        None, description="Where built-in models are converted/built; default the home. Shareable between homes."
    )
    host: str = "127.0.0.1"
    port: int = 8000
    embedded_worker: bool = Field(True, description="Run one training worker inside `tunehouse serve`.")
    upload_token_ttl_s: int = Field(3600, description="Lifetime of the signed upload URL, seconds.")
    max_file_bytes: int = Field(int(50.1 * GIB), description="Largest accepted upload (50.1 GiB, as the SDKs).")
    multipart_threshold_bytes: int = Field(5 * GIB, description="Files above this use the multipart flow.")
    docs: Literal["off", "key", "public"] = Field(
        "off", description="/docs and /openapi.json: off, behind an API key, or public (they map every route).")
    auth_failure_burst: int = Field(10, ge=1, description="Wrong API keys one client address may send at once "
                                    "before it is answered 429.")
    auth_failures_per_minute: float = Field(6, gt=0, description="How fast that allowance refills.")
    gpus: str | None = Field(None, pattern=r"^\d+(,\d+)*$", description="GPUs the training worker owns, e.g. "
                             "`0,1,2,3` (CUDA_VISIBLE_DEVICES of its training processes); default every visible GPU.")
    num_processes: int | None = Field(None, ge=1, description="Training processes per job (torchrun; one per GPU). "
                                      "Default: one per GPU the worker owns, one on a CPU-only machine.")
    heartbeat_timeout_s: float = Field(60, ge=5, description="Seconds without a heartbeat from a job's worker "
                                       "(it beats every 2 s) before another worker requeues the job, which "
                                       "resumes from its last checkpoint. Time is the database's clock.")
    dist_timeout_s: int = Field(1800, ge=10, description="Seconds a training process waits for the others in a "
                                "collective before the attempt fails and the job is requeued.")
    serve_max_batch_size: int = Field(32, ge=1, description="Sequences decoded together in one forward, at most.")
    serve_max_loaded_models: int = Field(2, ge=1, description="Base/full fine-tuned weights kept in memory (LRU).")
    serve_max_loaded_adapters: int = Field(8, ge=1, description="LoRA adapters kept attached per base (LRU).")
    serve_adapter_memory_mb: float = Field(1024, gt=0, description="Memory for attached LoRA adapters per base, "
                                           "MiB; beyond it the least recently used are dropped.")
    serve_dtype: str = Field("auto", description="Inference weights dtype: auto (bfloat16 on a GPU with bf16, else "
                             "float32), float32, bfloat16 or float16.")
    serve_threads: int | None = Field(None, ge=1, description="CPU threads for inference; default every core, half of "
                                      "them while the embedded worker's training process runs beside it.")
    serve_backend: Literal["auto", "torch", "llama.cpp"] = Field(
        "auto", description="What generates tokens: `llama.cpp` (llama-server, several times faster on a CPU; "
        "scoring, grammars and models it cannot load stay on torch), `torch`, or `auto`: llama.cpp on a "
        "machine without a GPU when a llama-server is found (`make llama-server` builds one), else torch.")
    serve_lora: Literal["adapter", "merged"] = Field(
        "adapter", description="How a LoRA fine-tune of a registry base is served: `adapter`, on its base (loaded "
        "once for all its fine-tunes) with the adapter applied per request (torch batches different fine-tunes "
        "together; llama.cpp runs them in turns, at ~0.85x the base's decoding speed in bf16), or `merged`, from "
        "its merged weights as a model of its own (about the base's speed; one more copy of the weights in memory "
        "per fine-tune, counted in serve_max_loaded_models; no batching across fine-tunes).")
    serve_llama_kv_tokens: int = Field(16384, ge=256, description="KV cache of each llama-server (tokens, at least "
                                       "the model's context length), shared by its requests: ones that would not "
                                       "fit (prompt + max_tokens) wait for room.")
    llama_server: Path | None = Field(None, description="The llama-server binary for the llama.cpp backend; "
                                      "default the one `make llama-server` built (a stock build lacks its streaming patch).")

    @field_validator("secret")
    @classmethod
    def _long_secret(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value()) < 32:
            raise ValueError("TUNEHOUSE_SECRET must be at least 32 characters (it signs upload URLs and seals "
                             "job keys); make one with `openssl rand -hex 32`")
        return v

    @field_validator("admin_key")
    @classmethod
    def _long_admin_key(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value()) < 32:
            raise ValueError("TUNEHOUSE_ADMIN_KEY must be at least 32 characters; make one with "
                             "`echo th-$(openssl rand -hex 24)`")
        return v

    @field_validator("serve_lora", mode="before")
    @classmethod
    def _lora_mode(cls, v):
        if v not in ("adapter", "merged"):
            raise ValueError(f"TUNEHOUSE_SERVE_LORA must be `adapter` (LoRA fine-tunes share their base) or "
                             f"`merged` (each served from its merged weights); got {v!r}")
        return v

    def model_post_init(self, _context) -> None:
        self.home = self.home.expanduser().resolve()

    @property
    def db_url(self) -> str:
        url = self.database_url or f"sqlite:///{self.home / 'tunehouse.db'}"
        # The usual `postgresql://` / `postgres://` means psycopg2 to SQLAlchemy; psycopg 3 is the driver installed.
        scheme, sep, rest = url.partition("://")
        return f"postgresql+psycopg://{rest}" if sep and scheme in ("postgres", "postgresql") else url

    @property
    def blobs_path(self) -> Path:
        return (self.blob_dir or self.home / "blobs").expanduser().resolve()

    @property
    def blob_location(self) -> str:
        """`blob_url`, or the local blob folder's path."""
        return self.blob_url or str(self.blobs_path)

    @property
    def blob_cache_path(self) -> Path:
        return (self.blob_cache_dir or self.home / "cache").expanduser().resolve()

    @property
    def blob_cache_bytes(self) -> int:
        return int(self.blob_cache_gb * GIB)

    @property
    def run_path(self) -> Path:
        """This machine's runtime files: training and endpoint logs, endpoint ports."""
        return self.home / "run"

    @property
    def work_path(self) -> Path:
        """This machine's scratch space for running jobs (what training writes before it is stored)."""
        return self.home / "work"

    @property
    def admin_key_path(self) -> Path:
        """Where the first `serve` stores the admin key so the CLI finds it with no set-up."""
        return self.home / "admin.key"

    @property
    def secret_path(self) -> Path:
        """HMAC secret that signs upload URLs; created on first start."""
        return self.home / "secret.key"

    @property
    def models_path(self) -> Path:
        return self.home / "models"
