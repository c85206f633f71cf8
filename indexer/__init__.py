"""infotrace indexer: model + training data -> attribution index (DESIGN.md 1, 2.1).

The stages: :mod:`indexer.features` (output functions, models, projection, tangent features),
:mod:`indexer.gp` (the surrogate and every score), :mod:`indexer.store` (the index directory),
:mod:`indexer.demo` (the digits demo); :func:`build_index` runs them in order.
"""

from __future__ import annotations

from indexer.build import build_index
from indexer.config import IndexConfig
from indexer.data import Dataset, load_arrays
from indexer.demo.mnist import build_demo_index, load_mnist_sample
from indexer.demo.train import train_classifier
from indexer.distributed import RayOptions
from indexer.enums import Direction, Objective, OutputKind, ProjectionKind, Score, parse_enum
from indexer.exceptions import (
    IndexCorruptError,
    IndexFormatError,
    IndexNotFoundError,
    IndexNotReadyError,
    InfotraceError,
    InvalidQueryError,
    InvalidTargetsError,
    ModelMismatchError,
    UnknownExampleError,
)
from indexer.features import (
    ClassificationMargin,
    DenseProjection,
    Features,
    LanguageModelMargin,
    ModelSpec,
    OutputFunction,
    RegressionOutput,
    build_model,
    causal_lm_targets,
    count_parameters,
    load_checkpoint,
    output_function_from_spec,
    per_example_gradients,
    register_model,
    register_output_function,
    save_checkpoint,
    tangent_features,
)
from indexer.gp import (
    CoresetResult,
    GreedyResult,
    QueryTerms,
    Surrogate,
    default_prior_precision,
    fit_surrogate,
)
from indexer.plugins import PluginError, load_plugins
from indexer.precomputed import build_from_features
from indexer.store import IndexData, Manifest, load_index, make_faiss_index, read_manifest

__all__ = [
    "RayOptions",
    "ClassificationMargin",
    "PluginError",
    "build_from_features",
    "load_plugins",
    "CoresetResult",
    "Dataset",
    "Direction",
    "Features",
    "GreedyResult",
    "IndexConfig",
    "IndexCorruptError",
    "IndexData",
    "IndexFormatError",
    "IndexNotFoundError",
    "IndexNotReadyError",
    "InfotraceError",
    "InvalidQueryError",
    "InvalidTargetsError",
    "LanguageModelMargin",
    "Manifest",
    "ModelMismatchError",
    "ModelSpec",
    "Objective",
    "OutputFunction",
    "OutputKind",
    "ProjectionKind",
    "QueryTerms",
    "DenseProjection",
    "RegressionOutput",
    "Score",
    "Surrogate",
    "UnknownExampleError",
    "build_demo_index",
    "build_index",
    "build_model",
    "causal_lm_targets",
    "count_parameters",
    "default_prior_precision",
    "fit_surrogate",
    "load_arrays",
    "load_checkpoint",
    "load_index",
    "load_mnist_sample",
    "make_faiss_index",
    "output_function_from_spec",
    "parse_enum",
    "per_example_gradients",
    "read_manifest",
    "register_model",
    "register_output_function",
    "save_checkpoint",
    "tangent_features",
    "train_classifier",
]
