"""Checksums of files, tensors and JSON documents (sha256, hex).

Used by the index writer and reader (every file's checksum in the manifest, the manifest's own), by the
shard store (a shard's checksum in its name, the build's work key) and by the service (a configured
checkpoint must be the one an index was built from).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

__all__ = ["sha256_file", "sha256_json", "tensor_digest"]


def sha256_file(path: Path, chunk_bytes: int = 2**20) -> str:
    """Hex sha256 of a file, read in chunks of ``chunk_bytes`` bytes.

    Raises:
        FileNotFoundError: no such file.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(document: Any) -> str:
    """Hex sha256 of ``document`` as canonical JSON (sorted keys, no whitespace).

    Args:
        document: any JSON-serialisable value.

    Returns:
        64 hex characters; equal documents (as JSON) give equal digests whatever their key order.
    """
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def tensor_digest(tensor: torch.Tensor) -> dict[str, Any]:
    """A JSON-able fingerprint of a tensor: dtype, shape and the sha256 of its bytes.

    Args:
        tensor: any tensor, on any device (copied to the CPU to be hashed).

    Returns:
        ``{"dtype": str, "shape": list[int], "sha256": hex str}`` (``""`` for an empty tensor).
    """
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    digest = hashlib.sha256(flat.view(torch.uint8).numpy().data).hexdigest() if flat.numel() else ""
    return {"dtype": str(tensor.dtype), "shape": list(tensor.shape), "sha256": digest}
