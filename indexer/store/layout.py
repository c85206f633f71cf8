"""File names, manifest keys and folder naming of the index directory (DESIGN.md 2.1).

Every name that reaches disk is defined here once, so the writer, the reader, the shard store and the
build cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "MANIFEST_CHECKSUM_FIELD",
    "PHI_FILE",
    "WHITENED_FILE",
    "CHOLESKY_FILE",
    "EXAMPLE_STATS_FILE",
    "QUERY_PHI_FILE",
    "TRAIN_INPUTS_FILE",
    "QUERY_INPUTS_FILE",
    "QUERY_STATS_FILE",
    "METADATA_FILE",
    "CHECKPOINT_FILE",
    "TOKENIZER_FILE",
    "faiss_file",
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

FORMAT_VERSION = 1
"""Version of the index directory layout; the loader refuses any other value."""

MANIFEST_FILE = "manifest.json"
MANIFEST_CHECKSUM_FIELD = "manifest_sha256"  # sha256 of the manifest's canonical JSON without this field
PHI_FILE = "phi.npy"  # `(n_train, k)` float32: raw projected tangent features
WHITENED_FILE = "whitened.npy"  # `(n_train, k)` float64: u_i = L^-1 phi_i
CHOLESKY_FILE = "cholesky.npy"  # `(k, k)` float64: lower factor L of the posterior precision A
EXAMPLE_STATS_FILE = "examples.npz"  # per-example vectors (beta, h, s, gradient term, norms, outputs)
QUERY_PHI_FILE = "query_phi.npy"  # `(n_query, k)` float32: stored query features (held-out split)
TRAIN_INPUTS_FILE = "inputs.npy"  # `(n_train, *input_shape)`: the training inputs, for rendering examples
QUERY_INPUTS_FILE = "query_inputs.npy"  # `(n_query, *input_shape)`: the stored queries' inputs
QUERY_STATS_FILE = "queries.npz"  # per-query outputs, labels and predictions
METADATA_FILE = "metadata.sqlite"  # one row per training example and per stored query
CHECKPOINT_FILE = "model.safetensors"  # the weights the features were taken from
TOKENIZER_FILE = "tokenizer.json"  # a language model's tokenizer (``tokenizers`` JSON), when given
_FAISS_FILE_TEMPLATE = "faiss_{score}.index"  # one FAISS index per score (DESIGN.md 1.3, vector form)


def faiss_file(score: str) -> str:
    """File name of the FAISS index over the vectors of ``score`` (a :class:`~indexer.enums.Score` value)."""
    return _FAISS_FILE_TEMPLATE.format(score=score)


# Keys of examples.npz / queries.npz
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
