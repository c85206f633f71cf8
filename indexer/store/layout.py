"""File names, manifest keys and folder naming of the index directory (DESIGN.md 2.1).

Every name that reaches disk is defined here once, so the writer, the reader, the shard store and the
build cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "FORMAT_VERSION",
    "READABLE_FORMAT_VERSIONS",
    "LEGACY_EXAMPLE_STATS_FILE",
    "LEGACY_QUERY_STATS_FILE",
    "MANIFEST_FILE",
    "MANIFEST_CHECKSUM_FIELD",
    "PHI_FILE",
    "phi_segment_file",
    "CHOLESKY_FILE",
    "example_file",
    "query_stats_file",
    "FAISS_FILE",
    "FAISS_TRAINED_FILE",
    "faiss_shard_file",
    "QUERY_PHI_FILE",
    "TRAIN_INPUTS_FILE",
    "QUERY_INPUTS_FILE",
    "METADATA_FILE",
    "EXAMPLE_FILE_PREFIX",
    "QUERY_STATS_FILE_PREFIX",
    "keys_of",
    "CHECKPOINT_FILE",
    "TOKENIZER_FILE",
    "KEY_BETA",
    "KEY_GRAD_TERM",
    "KEY_H",
    "KEY_S",
    "KEY_PHI_NORM",
    "KEY_OUTPUT",
    "KEY_LABEL",
    "KEY_PREDICTION",
    "KEY_MODEL_OUTPUT",
    "KEY_PROBABILITIES",
    "INDEX_NAME_PATTERN",
    "SQLITE_TABLE",
    "SPLIT_TRAIN",
    "SPLIT_QUERY",
    "scratch_prefix",
    "replaced_prefix",
    "work_prefix",
    "lock_path",
]

READABLE_FORMAT_VERSIONS = (1, 2)
"""Layouts the loader reads: version 1 (float32 features, ``examples.npz``/``queries.npz``, one flat FAISS
index per score) is served by the exact scan of its features, its other files left unread."""
LEGACY_EXAMPLE_STATS_FILE = "examples.npz"  # format 1: the per-example arrays in one archive
LEGACY_QUERY_STATS_FILE = "queries.npz"  # format 1: the per-query arrays in one archive
FORMAT_VERSION = 2
"""Version of the index directory layout; the loader refuses any other value. Version 2: the features stored
once (float16 by default), no whitened copy, one memory-mappable ``.npy`` per per-example array, FAISS only
for an approximate index (exact retrieval scans the features)."""

MANIFEST_FILE = "manifest.json"
MANIFEST_CHECKSUM_FIELD = "manifest_sha256"  # sha256 of the manifest's canonical JSON without this field
PHI_FILE = "phi.npy"  # `(n_train, k)` float16 (or float32): projected tangent features, stored once
CHOLESKY_FILE = "cholesky.npy"  # `(k, k)` float64: lower factor L of the posterior precision A
QUERY_PHI_FILE = "query_phi.npy"  # `(n_query, k)` phi's dtype: stored query features (held-out split)
FAISS_FILE = "faiss.index"  # an approximate FAISS index over the information-gain vectors, when asked for
FAISS_TRAINED_FILE = "faiss.trained.index"  # the same index trained and empty: where an add starts a shard
TRAIN_INPUTS_FILE = "inputs.npy"  # `(n_train, *input_shape)`: the training inputs, for rendering examples
QUERY_INPUTS_FILE = "query_inputs.npy"  # `(n_query, *input_shape)`: the stored queries' inputs
METADATA_FILE = "metadata.sqlite"  # one row per training example and per stored query
CHECKPOINT_FILE = "model.safetensors"  # the weights the features were taken from
TOKENIZER_FILE = "tokenizer.json"  # a language model's tokenizer (``tokenizers`` JSON), when given
EXAMPLE_FILE_PREFIX = "examples."  # examples.<key>.npy: one `(n_train, ...)` array per key below
QUERY_STATS_FILE_PREFIX = "queries."  # queries.<key>.npy: one `(n_query, ...)` array per key below


def faiss_shard_file(shard: int) -> str:
    """File of the approximate index's ``shard``-th part: ``faiss.index`` for the first, ``faiss.<j>.index``
    after (the vectors appended by adds; the manifest's ``faiss.shards`` gives each file's vectors)."""
    return FAISS_FILE if shard == 0 else f"faiss.{shard}.index"


def phi_segment_file(segment: int) -> str:
    """File of the training features' ``segment``-th part: ``phi.npy`` for the first, ``phi.<j>.npy`` after
    (rows appended by adds; the manifest's ``counts.phi_segments`` gives each file's rows)."""
    return PHI_FILE if segment == 0 else f"phi.{segment}.npy"


def example_file(key: str) -> str:
    """File of the per-example array ``key`` (``examples.beta.npy``): memory-mapped by the reader."""
    return f"{EXAMPLE_FILE_PREFIX}{key}.npy"


def query_stats_file(key: str) -> str:
    """File of the per-stored-query array ``key`` (``queries.label.npy``)."""
    return f"{QUERY_STATS_FILE_PREFIX}{key}.npy"


def keys_of(files: list[str] | set[str], prefix: str) -> list[str]:
    """The array keys of the files named ``<prefix><key>.npy`` among ``files``, sorted."""
    return sorted(
        name[len(prefix) : -len(".npy")]
        for name in files
        if name.startswith(prefix) and name.endswith(".npy")
    )


# Keys of the per-example and per-query arrays
KEY_BETA = "beta"  # likelihood weight beta_i (noise precision)
KEY_GRAD_TERM = "grad_term"  # beta_i r_i: derivative of the log-likelihood w.r.t. the output
KEY_H = "h"  # posterior variance of f_i
KEY_S = "s"  # one minus the leverage, clamped at the surrogate's s_floor
KEY_PHI_NORM = "phi_norm"  # |phi_i|
KEY_OUTPUT = "output"  # output function value m_i at theta*
KEY_LABEL = "label"  # target y_i
KEY_PREDICTION = "prediction"  # predicted class (classification) or output (regression)
KEY_MODEL_OUTPUT = "model_output"  # `(n, n_summary)` OutputFunction.summarize of the raw outputs (logits)
KEY_PROBABILITIES = "probabilities"  # `(n, n_classes)` softmax, classification only

INDEX_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
"""Index names (= folder names): what the service accepts in a URL, so the indexer refuses anything else."""

SQLITE_TABLE = "examples"
SPLIT_TRAIN = "train"
SPLIT_QUERY = "query"


# ---- sibling folders of an index folder <parent>/<name> -------------------------------------------------
# All start with ".<name>." so that the service (which skips dot-folders) never serves them and a build
# holding the lock of <name> can recognise what interrupted builds of the same index left behind.


def scratch_prefix(out_dir: Path) -> str:
    """Name prefix of the temporary folder a new version of ``out_dir`` is written into: ``.<name>.tmp-``."""
    return f".{Path(out_dir).name}.tmp-"


def replaced_prefix(out_dir: Path) -> str:
    """Name prefix of a replaced version of ``out_dir``, moved aside until it is deleted: ``.<name>.old-``."""
    return f".{Path(out_dir).name}.old-"


def work_prefix(out_dir: Path) -> str:
    """Name prefix of the shard work folders of builds of ``out_dir``: ``.<name>.work-`` (+ key)."""
    return f".{Path(out_dir).name}.work-"


def lock_path(out_dir: Path) -> Path:
    """The build lock file of ``out_dir``: ``<parent>/.<name>.lock``."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.lock"
