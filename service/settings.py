"""Service settings, read from ``INFOTRACE_*`` environment variables (pydantic-settings)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    """Configuration of the attribution service.

    Every field is read from the environment variable ``INFOTRACE_<FIELD>`` (e.g. ``INFOTRACE_INDEX_ROOT``).
    """

    model_config = SettingsConfigDict(env_prefix="INFOTRACE_", frozen=True)

    index_root: Path = Field(description="folder whose subfolders are index directories (required)")
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to bind (0: any free port)")
    max_top_k: int = Field(1000, ge=1, description="largest top_k a request may ask for")
    max_candidates: int = Field(100_000, ge=1, description="largest retrieval depth a request may ask for")
    default_candidates: int = Field(100, ge=1, description="retrieval depth before the exact rerank")
    max_subset_size: int = Field(200, ge=1, description="largest greedy subset a request may ask for")
    max_subset_candidates: int = Field(5000, ge=1, description="largest candidate pool of a subset request")
    compute_threads: int | None = Field(
        1,
        ge=1,
        description="threads for torch, BLAS and FAISS per process (None: leave the libraries' defaults); "
        "one query is memory-bound, and several thread pools on few cores contend (3x slower, measured)",
    )
    projection_cache_bytes: int = Field(
        1 << 30, ge=0, description="keep the projection matrix in memory when it is at most this many bytes"
    )
