"""Featurizing a dataset: consecutive batches in buffers, each finished buffer cached (DESIGN.md 1.7, 2.1).

:func:`tangent_features` runs a :class:`~indexer.features.featurize.Featurizer` over a dataset in buffers of
consecutive examples; each finished buffer can be handed to a :class:`BufferCache` (the indexer's shard store,
:mod:`indexer.store.shards`), so that an interrupted build resumes from the buffers it already finished.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from indexer.data import Batch, Dataset, Examples, StreamedDataset
from indexer.exceptions import InvalidTargetsError
from indexer.features.featurize import BufferFeatures, Features, Featurizer, host_array
from indexer.features.tasks import OutputFunction

__all__ = [
    "BufferCache",
    "batch_digest",
    "check_batch",
    "check_finite_inputs",
    "check_targets",
    "checked_batches",
    "shard_rows",
    "tangent_features",
]


class BufferCache(Protocol):
    """Keeps finished buffers of :func:`tangent_features` (e.g. :class:`indexer.store.shards.SplitShards`).

    Buffer ``b`` holds examples ``[b * buffer_rows, min((b + 1) * buffer_rows, n))``; the cache must only
    hand back buffers computed with the same model, output function, projection, data and buffer layout.
    """

    def load(self, buffer: int, rows: int, digest: str) -> BufferFeatures | None:
        """The stored, verified buffer ``buffer`` of ``rows`` examples whose data had the sha256 ``digest``,
        or None to compute it."""
        ...

    def save(self, buffer: int, features: BufferFeatures, digest: str) -> None:
        """Store buffer ``buffer`` (of data with the sha256 ``digest``) once it is complete."""
        ...


def batch_digest(batches: Sequence[Batch]) -> str:
    """Hex sha256 of the inputs and targets of consecutive batches (dtype, shape and bytes of each tensor):
    a buffer's shard is reused only for the same data."""
    digest = hashlib.sha256()
    for batch in batches:
        tensors = [*batch.inputs.values()] if isinstance(batch.inputs, dict) else [batch.inputs]
        for tensor in [*tensors, batch.targets]:
            flat = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def shard_rows(featurizer: Featurizer, batch_size: int, buffer_bytes: int, shard_examples: int | None) -> int:
    """Examples per buffer (one shard of a resumable or Ray build, DESIGN.md 2.3): ``shard_examples`` rounded
    up to whole batches, but never more than the featurizer's memory budget allows.

    Args:
        featurizer: its ``buffer_rows`` is the budget's bound; batch_size: examples per batch;
        buffer_bytes: the featurizer's memory budget per buffer, in bytes; shard_examples: the wanted size
            (None: the bound).

    Returns:
        A positive multiple of ``batch_size``.
    """
    bound = featurizer.buffer_rows(batch_size, buffer_bytes)
    if shard_examples is None:
        return bound
    return min(bound, -(-shard_examples // batch_size) * batch_size)


def _buffers(batches: Iterable[Batch], rows: int) -> Iterator[list[Batch]]:
    """Consecutive batches grouped into buffers of ``rows`` examples (the last one may be shorter)."""
    group: list[Batch] = []
    count = 0
    for batch in batches:
        group.append(batch)
        count += len(batch)
        if count >= rows:
            yield group
            group, count = [], 0
    if group:
        yield group


def tangent_features(
    featurizer: Featurizer,
    output_fn: OutputFunction,
    batches: Examples | Iterable[Batch],
    batch_size: int = 128,
    buffer_bytes: int = 256 * 2**20,
    progress: str | None = None,
    cache: BufferCache | None = None,
    keep_inputs: bool = False,
    total: int | None = None,
    shard_examples: int | None = None,
) -> Features:
    """Projected tangent features of every example, in buffers of consecutive batches (DESIGN.md 1.1, 1.7).

    The batches are read once, in order; only the current buffer's batches are held, plus the `(n, k)`
    features, the outputs and the targets (and the inputs only when ``keep_inputs``).

    Args:
        featurizer: a :class:`~indexer.features.featurize.DenseFeaturizer` or a ``HookFeaturizer``; its
            model is in eval mode.
        output_fn: the output function m.
        batches: the examples: a :class:`~indexer.data.Dataset` or :class:`~indexer.data.StreamedDataset`
            (read ``batch_size`` at a time), or batches of ``batch_size`` (the last may be shorter).
        batch_size: the size of every batch but the last (it sets the buffer layout).
        buffer_bytes: the featurizer's memory budget per buffer, in bytes (see its ``buffer_rows``).
        progress: a tqdm description, or None for no progress bar.
        cache: where finished buffers are kept: a buffer it holds for the same data is taken from it, every
            buffer computed is saved to it. None: no cache.
        keep_inputs: also return the inputs (the first tensor of a mapping), e.g. to store them for rendering.
        total: the number of examples, for the progress bar (None: unknown).
        shard_examples: examples per buffer, rounded up to whole batches (:func:`shard_rows`; None: as many as
            ``buffer_bytes`` allows).

    Returns:
        :class:`~indexer.features.featurize.Features` with `(n, k)` float32 ``phi``.

    Raises:
        ValueError: a batch whose inputs and targets disagree in length, or whose inputs or targets have
            another shape per example than the first batch's (sequences padded to each batch's longest).
    """
    if isinstance(batches, Dataset | StreamedDataset):
        total = len(batches) if isinstance(batches, Dataset) else total
        batches = batches.batches(batch_size)
    rows_per_buffer = shard_rows(featurizer, batch_size, buffer_bytes, shard_examples)
    parts: list[BufferFeatures] = []
    targets: list[np.ndarray] = []
    metadata: list[dict[str, Any]] = []
    inputs: list[np.ndarray] = []
    first: Batch | None = None
    with tqdm(total=total, desc=progress, unit="ex", disable=progress is None, leave=False) as bar:
        for buffer, group in enumerate(_buffers(batches, rows_per_buffer)):
            first = group[0] if first is None else first
            for batch in group:
                check_batch(batch, first)
            rows = sum(len(b) for b in group)
            digest = batch_digest(group) if cache is not None else ""
            done = cache.load(buffer, rows, digest) if cache is not None else None
            if done is None:
                done = featurizer.featurize_buffer(output_fn, group)
                if cache is not None:
                    cache.save(buffer, done, digest)
            bar.update(rows)
            parts.append(done)
            for batch in group:
                targets.append(host_array(batch.targets))
                metadata.extend(batch.metadata)
                if keep_inputs:
                    inputs.append(host_array(batch.first_input))
    if first is None:  # no examples (an empty query split)
        empty = np.zeros(0)
        return Features(
            np.zeros((0, featurizer.k), np.float32), empty, np.zeros((0, 0), np.float32), empty, empty, empty
        )
    done = BufferFeatures.concatenate(parts)
    return Features(
        phi=done.phi,
        outputs=done.outputs,
        model_outputs=done.model_outputs,
        targets=np.concatenate(targets),
        beta=done.beta,
        grad_term=done.grad_term,
        metadata=metadata,
        inputs=np.concatenate(inputs) if keep_inputs else None,
        input_shape=tuple(int(d) for d in first.first_input.shape[1:]),
        input_dtype=_dtype_name(first.first_input.dtype),
        input_dtypes=(
            {key: _dtype_name(value.dtype) for key, value in first.inputs.items()}
            if isinstance(first.inputs, dict)
            else None
        ),
    )


def _dtype_name(dtype: torch.dtype) -> str:
    """``"int64"`` for ``torch.int64``: the name the manifest records."""
    return str(dtype).removeprefix("torch.")


def check_batch(batch: Batch, first: Batch) -> None:
    """Refuse a batch whose inputs and targets disagree in length, or whose shapes per example differ from
    the first batch's: the features, outputs and targets of all batches are stacked into one array each.

    Args:
        batch: the batch to check; first: the first batch of the same examples.

    Raises:
        ValueError: says which shapes differ and how to pad.
    """
    if len(batch.first_input) != len(batch):
        raise ValueError(f"a batch of {len(batch)} targets has {len(batch.first_input)} inputs")
    for what, got, want in (
        ("inputs", batch.first_input, first.first_input),
        ("targets", batch.targets, first.targets),
    ):
        if got.shape[1:] != want.shape[1:]:
            raise ValueError(
                f"a batch's {what} have shape {list(got.shape[1:])} per example, the first batch's "
                f"{list(want.shape[1:])}: every batch must have the same shape per example (pad sequences to "
                "one fixed length, e.g. the collator's padding='max_length', not to each batch's longest)"
            )


def check_targets(
    output_fn: OutputFunction, targets: torch.Tensor, n_outputs: int, split: str, start: int
) -> None:
    """The output function's check of one batch's targets, its error naming the examples of the split.

    Args:
        output_fn: the output function; targets: `(B, ...)` the batch's targets; n_outputs: the model's
            output width per example; split: ``"train"`` or ``"query"``; start: the batch's first example.

    Raises:
        ValueError: the targets break a rule; the message names the examples (``train example(s) [19]``,
            from an :class:`~indexer.exceptions.InvalidTargetsError`'s rows) or the batch's range.
    """
    try:
        output_fn.check_targets(targets, n_outputs)
    except InvalidTargetsError as exc:
        if not exc.rows:
            raise ValueError(f"{split} examples {start}..{start + len(targets) - 1}: {exc}") from exc
        named = [start + row for row in exc.rows[:10]]
        more = f" and {len(exc.rows) - 10} more" if len(exc.rows) > 10 else ""
        raise ValueError(f"{split} example(s) {named}{more}: {exc.reason}") from exc
    except ValueError as exc:
        raise ValueError(f"{split} examples {start}..{start + len(targets) - 1}: {exc}") from exc


def check_finite_inputs(batch: Batch, split: str, start: int) -> None:
    """Refuse floating-point inputs that hold NaN or infinity (in the dtype the model gets: a float64
    value beyond float32's range is infinite once cast).

    Args:
        batch: one batch; split: ``"train"`` or ``"query"``; start: the id of its first example.

    Raises:
        ValueError: names the split, the example and the dtype.
    """
    tensors = batch.inputs.items() if isinstance(batch.inputs, Mapping) else [("", batch.inputs)]
    for key, x in tensors:
        if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
            continue
        bad = ~torch.isfinite(x.reshape(len(x), -1)).all(dim=1)
        if bool(bad.any()):
            row = start + int(bad.nonzero()[0, 0])
            where = f" {key!r}" if key else ""
            dtype = str(x.dtype).removeprefix("torch.")
            raise ValueError(
                f"{split} example {row}: its input{where} holds NaN or infinity as {dtype} (or a value "
                "beyond that type's range, e.g. float64 data cast for a float32 model); give finite inputs"
            )


def checked_batches(
    data: Examples, batch_size: int, output_fn: OutputFunction, n_outputs: int, split: str, start: int = 0
) -> Iterator[Batch]:
    """The batches of ``data``, each refused before it is featurized when its shapes differ from the first
    batch's, its targets break the output function's rules or its inputs are not finite.

    Args:
        data: the examples; batch_size: examples per batch; output_fn: the output function; n_outputs: the
            model's output width; split: ``"train"`` or ``"query"``; start: the id of ``data``'s first example
            (a Ray task's shard starts past 0), for the messages.

    Yields:
        :class:`~indexer.data.Batch` objects, in order.

    Raises:
        ValueError: names the split and the examples.
    """
    first = None
    for batch in data.batches(batch_size):
        first = batch if first is None else first
        try:  # the shapes first: targets of another length would be checked against the wrong width
            check_batch(batch, first)
        except ValueError as exc:
            raise ValueError(f"{split} examples {start}..{start + len(batch) - 1}: {exc}") from exc
        check_targets(output_fn, batch.targets, n_outputs, split, start)
        check_finite_inputs(batch, split, start)
        start += len(batch)
        yield batch
