"""File names, manifest keys and numerical constants of the index format (DESIGN.md 2.1).

Every name that reaches disk is defined here once, so the writer and the reader cannot drift apart.
"""

from __future__ import annotations

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
FAISS_FILE_TEMPLATE = "faiss_{score}.index"  # one FAISS index per score (DESIGN.md 1.3, vector form)

# Keys of examples.npz / queries.npz
KEY_BETA = "beta"  # likelihood weight beta_i (noise precision)
KEY_GRAD_TERM = "grad_term"  # beta_i r_i: derivative of the log-likelihood w.r.t. the output
KEY_H = "h"  # posterior variance of f_i
KEY_S = "s"  # one minus the leverage, clamped at S_FLOOR
KEY_PHI_NORM = "phi_norm"  # |phi_i|
KEY_OUTPUT = "output"  # output function value m_i at theta*
KEY_LABEL = "label"  # target y_i
KEY_PREDICTION = "prediction"  # predicted class (classification) or output (regression)
KEY_MODEL_OUTPUT = "model_output"  # `(n, n_outputs)` raw model outputs (logits), for predictive entropy
KEY_PROBABILITIES = "probabilities"  # `(n, n_classes)` softmax, classification only

S_FLOOR = 1e-6
"""Floor on s_i = 1 - beta_i h_i (DESIGN.md 1.5): keeps influence and information loss finite."""

PROJECTION_BLOCK_ROWS = 4096
"""Rows of the projection matrix generated per seeded block. Fixed so that features do not depend on
how many blocks are processed at a time (DESIGN.md 1.1: same seed, same model => same features)."""

INDEX_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
"""Index names (= folder names): what the service accepts in a URL, so the indexer refuses anything else."""

SQLITE_TABLE = "examples"
SPLIT_TRAIN = "train"
SPLIT_QUERY = "query"
