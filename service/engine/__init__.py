"""The online engine: the index registry, query featurization and validation, FAISS retrieval with the
exact rerank, and the per-index engine that returns typed results (DESIGN.md 2.2)."""

from __future__ import annotations

from service.engine.engine import AttributionEngine
from service.engine.query import Query, QueryFeaturizer
from service.engine.registry import IndexRegistry
from service.engine.results import (
    Attribution,
    Coreset,
    CoresetMember,
    ExampleRecord,
    QueryDescription,
    RankedExample,
    SubsetAttribution,
    SubsetMember,
    Timings,
)
from service.engine.retrieval import Ranked, Retriever

__all__ = [
    "Attribution",
    "AttributionEngine",
    "Coreset",
    "CoresetMember",
    "ExampleRecord",
    "IndexRegistry",
    "Query",
    "QueryDescription",
    "QueryFeaturizer",
    "Ranked",
    "RankedExample",
    "Retriever",
    "SubsetAttribution",
    "SubsetMember",
    "Timings",
]
