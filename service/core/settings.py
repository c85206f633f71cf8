"""Service settings, read from ``INFOTRACE_*`` environment variables (pydantic-settings)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["DEFAULT_PROJECTION_CACHE_BYTES", "Settings"]

DEFAULT_PROJECTION_CACHE_BYTES = 1 << 30
"""Keep the projection matrix R in memory when it is at most this many bytes (1 GiB): a raw query is then
featurized in milliseconds instead of regenerating R's blocks (``INFOTRACE_PROJECTION_CACHE_BYTES``)."""


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
    reload_interval: float = Field(
        2.0,
        ge=0,
        description="seconds between checks for new index versions (an update's add or remove), loaded and "
        "swapped in without a restart; 0: never",
    )
    max_nprobe: int = Field(
        4096, ge=1, description="largest nprobe a request may ask of an approximate IVF index"
    )
    max_ef_search: int = Field(
        4096, ge=1, description="largest ef_search a request may ask of an approximate HNSW index"
    )
    max_subset_size: int = Field(200, ge=1, description="largest greedy subset a request may ask for")
    max_coreset_size: int = Field(
        100, ge=1, description="largest coreset a request may ask for (about 6 steps/s on the demo index)"
    )
    max_subset_candidates: int = Field(5000, ge=1, description="largest candidate pool of a subset request")
    compute_threads: int | None = Field(
        1,
        ge=1,
        description="threads for torch, BLAS and FAISS per process (None: leave the libraries' defaults); "
        "one query is memory-bound, and several thread pools on few cores contend (3x slower, measured)",
    )
    projection_cache_bytes: int = Field(
        DEFAULT_PROJECTION_CACHE_BYTES,
        ge=0,
        description="keep the projection matrix in memory when it is at most this many bytes",
    )
    workers: int | None = Field(
        None,
        ge=1,
        description="worker processes serving requests (None: the CPUs this process may use); each loads "
        "every index, whose memory-mapped files the operating system shares between them",
    )
    worker_threads: int = Field(
        4,
        ge=1,
        description="threads per worker process that run request handlers (more queue, first come first "
        "served): the handlers are CPU-bound and share one interpreter lock, so a few threads keep the "
        "tail latency low",
    )
    worker_timeout_s: float = Field(
        120.0,
        gt=0,
        description="seconds a worker may go silent (its event loop blocked, e.g. loading the indexes at "
        "start) before the master replaces it",
    )
    max_batch: int = Field(
        256, ge=1, description="largest number of queries in one request to the batch attribution route"
    )
    batch_inputs_together: bool = Field(
        True,
        description="featurize the raw inputs of one batch request in one forward and backward pass (faster; "
        "each feature equals the single route's up to float32 rounding, so after the float16 rounding of "
        "an index's features a score may differ in its third significant digit); false: each input on its "
        "own, so that every answer is bit for bit the single route's",
    )
    max_body_bytes: int = Field(
        8 << 20, ge=1024, description="largest request body accepted, in bytes (larger: 413)"
    )
    request_timeout_s: float = Field(
        30.0, gt=0, description="seconds a request may take before the service answers 503 instead"
    )
    body_timeout_s: float = Field(
        10.0,
        gt=0,
        description="seconds a client has to send a request's line and headers (slower: the connection is "
        "closed), and then its whole body once the service reads it (slower, or a Content-Length longer "
        "than the body: 408 and the connection closed)",
    )
    api_keys: SecretStr | None = Field(
        None, description="comma-separated API keys; when set (or api_keys_file), /v1 and /metrics need one"
    )
    api_keys_file: Path | None = Field(
        None, description="file with one API key per line (blank lines ignored)"
    )
    allow_unauthenticated: bool = Field(
        False, description="serve without API keys on a non-loopback host (refused otherwise)"
    )
    model_checkpoints: dict[str, Path] = Field(
        default_factory=dict,
        description="index name -> checkpoint to featurize raw queries with (JSON object); its sha256 must "
        "equal the one the index was built from, else raw queries get 409",
    )
    trusted_model_factories: list[str] = Field(
        default_factory=list,
        description="import-path model factories ('pkg.module:fn', JSON list) that index manifests may name; "
        "registered names (mlp, logistic_regression) are always allowed",
    )
    plugins: list[str] = Field(
        default_factory=list,
        description="plugin modules imported at start, before any index loads (JSON list of module names or "
        ".py paths): they register custom output functions and model factories; nothing else is imported",
    )
    use_gpu: bool | None = Field(
        None, description="search FAISS on the GPUs (needs the gpu extra, faiss-gpu); unset: when one is seen"
    )
    json_logs: bool = Field(True, description="structured JSON log lines with a request id")

    @model_validator(mode="after")
    def _consistent_limits(self) -> Settings:
        """A default above its own limit would make every request that leaves it out fail."""
        if self.default_candidates > self.max_candidates:
            raise ValueError(
                f"default_candidates ({self.default_candidates}) must be at most max_candidates "
                f"({self.max_candidates})"
            )
        return self

    def keys(self) -> list[bytes]:
        """The configured API keys as bytes (empty: authentication off).

        Raises:
            FileNotFoundError: ``api_keys_file`` is set but does not exist.
            ValueError: ``api_keys_file`` holds no key (authentication would silently be off).
        """
        found = [] if self.api_keys is None else self.api_keys.get_secret_value().split(",")
        if self.api_keys_file is not None:
            from_file = [line for line in self.api_keys_file.read_text().splitlines() if line.strip()]
            if not from_file:
                raise ValueError(f"INFOTRACE_API_KEYS_FILE={self.api_keys_file} holds no key (one per line)")
            found += from_file
        return [key.strip().encode() for key in found if key.strip()]

    @property
    def loopback(self) -> bool:
        """Whether the bind address is a loopback address."""
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"
