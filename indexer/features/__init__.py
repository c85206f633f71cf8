"""Featurization (DESIGN.md 1.1, 1.7): output functions, model specs and checkpoints, the projection, and
per-example projected tangent features."""

from __future__ import annotations

from indexer.features.featurize import (
    BufferFeatures,
    DenseFeaturizer,
    Features,
    Featurizer,
    buffer_rows,
    count_parameters,
    example_gradient,
    per_example_gradients,
)
from indexer.features.hooks import HookFeaturizer, layer_kind

# the sequence output function registers itself: importing it here puts it in the registry wherever output
# functions are looked up (every import of indexer.features.tasks runs this package's __init__ first)
from indexer.features.language import IGNORE_INDEX, LanguageModelMargin, causal_lm_targets, shift_labels
from indexer.features.models import (
    ModelSpec,
    build_model,
    load_checkpoint,
    logistic_regression,
    mlp,
    register_model,
    save_checkpoint,
)
from indexer.features.plan import fired_modules, plan_kronecker
from indexer.features.projection import (
    PROJECTION_BLOCK_ROWS,
    DenseProjection,
    KroneckerProjection,
    LayerBlock,
    RestBlock,
    seeded_matrix,
)
from indexer.features.stream import BufferCache, tangent_features
from indexer.features.tasks import (
    ClassificationMargin,
    OutputFunction,
    RegressionOutput,
    gaussian_entropy,
    label_margin,
    output_function_from_spec,
    register_output_function,
)

__all__ = [
    "BufferCache",
    "BufferFeatures",
    "ClassificationMargin",
    "Features",
    "ModelSpec",
    "DenseFeaturizer",
    "Featurizer",
    "HookFeaturizer",
    "IGNORE_INDEX",
    "LanguageModelMargin",
    "causal_lm_targets",
    "shift_labels",
    "KroneckerProjection",
    "LayerBlock",
    "RestBlock",
    "fired_modules",
    "layer_kind",
    "plan_kronecker",
    "seeded_matrix",
    "OutputFunction",
    "PROJECTION_BLOCK_ROWS",
    "DenseProjection",
    "RegressionOutput",
    "buffer_rows",
    "build_model",
    "count_parameters",
    "example_gradient",
    "gaussian_entropy",
    "label_margin",
    "load_checkpoint",
    "logistic_regression",
    "mlp",
    "output_function_from_spec",
    "per_example_gradients",
    "register_model",
    "register_output_function",
    "save_checkpoint",
    "tangent_features",
]
