"""infotrace indexer: model + training data -> attribution index (DESIGN.md 1, 2.1)."""

from __future__ import annotations

from indexer.build import IndexConfig, build_index, make_faiss_index
from indexer.coreset import CoresetResult, coreset_information_gain, summed_information_gain
from indexer.data import Dataset, load_arrays, load_mnist_sample
from indexer.enums import Direction, Objective, OutputKind, ProjectionKind, Score, parse_enum
from indexer.exceptions import (
    IndexCorruptError,
    IndexFormatError,
    IndexNotFoundError,
    InfotraceError,
    InvalidQueryError,
    ModelMismatchError,
    UnknownExampleError,
)
from indexer.featurize import Features, count_parameters, per_example_gradients, tangent_features
from indexer.index_format import IndexData, load_index, read_manifest
from indexer.models import ModelSpec, build_model, load_checkpoint, register_model, save_checkpoint
from indexer.projection import RandomProjection
from indexer.scores import example_scores, query_vector, score_from_inner, score_vectors, signed_score
from indexer.subset import (
    GreedyResult,
    greedy_subset,
    joint_information_gain,
    joint_information_loss,
    joint_score,
)
from indexer.surrogate import QueryTerms, Surrogate, default_prior_precision, fit_surrogate
from indexer.tasks import (
    ClassificationMargin,
    OutputFunction,
    RegressionOutput,
    output_function_from_spec,
    register_output_function,
)

__all__ = [
    "ClassificationMargin",
    "CoresetResult",
    "coreset_information_gain",
    "summed_information_gain",
    "Dataset",
    "Direction",
    "Features",
    "GreedyResult",
    "IndexConfig",
    "IndexCorruptError",
    "IndexData",
    "IndexFormatError",
    "IndexNotFoundError",
    "InfotraceError",
    "InvalidQueryError",
    "ModelMismatchError",
    "ModelSpec",
    "Objective",
    "OutputFunction",
    "OutputKind",
    "ProjectionKind",
    "QueryTerms",
    "RandomProjection",
    "RegressionOutput",
    "Score",
    "Surrogate",
    "UnknownExampleError",
    "build_index",
    "build_model",
    "count_parameters",
    "default_prior_precision",
    "example_scores",
    "fit_surrogate",
    "greedy_subset",
    "joint_information_gain",
    "joint_information_loss",
    "joint_score",
    "load_arrays",
    "load_checkpoint",
    "load_index",
    "load_mnist_sample",
    "make_faiss_index",
    "output_function_from_spec",
    "parse_enum",
    "per_example_gradients",
    "query_vector",
    "read_manifest",
    "register_model",
    "register_output_function",
    "save_checkpoint",
    "score_from_inner",
    "score_vectors",
    "signed_score",
    "tangent_features",
]
