"""The index directory (DESIGN.md 2.1): file names and keys, the typed manifest, checksums, FAISS, the
atomic writer, the verifying reader and the resumable build's shards."""

from __future__ import annotations

from indexer.store.faiss_index import gpu_count, make_faiss_index, max_norm, read_faiss_index, to_gpus
from indexer.store.hashing import sha256_file, sha256_json, tensor_digest
from indexer.store.manifest import Manifest, manifest_checksum, read_manifest
from indexer.store.reader import IndexData, MetadataStore, load_index
from indexer.store.sections import Counts, FaissInfo, FileEntry, ModelInfo, ProjectionInfo, SurrogateInfo
from indexer.store.writer import MetadataRow, write_index_dir

__all__ = [
    "Counts",
    "FaissInfo",
    "FileEntry",
    "IndexData",
    "Manifest",
    "MetadataRow",
    "MetadataStore",
    "ModelInfo",
    "ProjectionInfo",
    "SurrogateInfo",
    "gpu_count",
    "load_index",
    "make_faiss_index",
    "manifest_checksum",
    "max_norm",
    "read_faiss_index",
    "read_manifest",
    "sha256_file",
    "sha256_json",
    "tensor_digest",
    "to_gpus",
    "write_index_dir",
]
