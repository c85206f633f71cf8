"""The text demo's data: real English passages from the docstrings of the Python standard library, a
byte-level BPE tokenizer trained on them, token-id batches for a causal language model.

Nothing is downloaded: the passages are read (never imported) from the ``.py`` files of the running
interpreter's standard library with :mod:`ast`, in sorted file order, so they are the same on every run of
one Python version. The tokenizer is a ``tokenizers`` BPE model saved as JSON (no pickle).
"""

from __future__ import annotations

import ast
import re
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "SKIPPED_STDLIB_FOLDERS",
    "encode_passages",
    "stdlib_passages",
    "train_tokenizer",
]

SKIPPED_STDLIB_FOLDERS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"})
"""Standard-library folders whose docstrings are not read (third-party packages, test suites)."""

_SPACE = re.compile(r"\s+")
_PROSE = re.compile(r"[A-Za-z]{3,}")


def _docstrings(path: Path) -> Iterable[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            text = ast.get_docstring(node, clean=True)
            if text:
                yield text


def stdlib_passages(min_chars: int = 80, max_chars: int = 400, root: Path | None = None) -> list[str]:
    """Paragraphs of the standard library's docstrings, as prose passages.

    Each docstring is split at blank lines; a paragraph is kept when, with its whitespace collapsed, it has
    ``min_chars`` to ``max_chars`` characters and is mostly words (doctest examples, tables and code are
    dropped: at least half of its characters are in words of three letters or more, and it does not start
    with ``>>>``). Duplicates are kept once, in first-seen order.

    Args:
        min_chars, max_chars: the length range of a passage, in characters.
        root: the standard library folder (default: the running interpreter's).

    Returns:
        The passages, in sorted file order then source order.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
    """
    root = Path(root or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"standard library folder {root} does not exist")
    seen: dict[str, None] = {}
    files = sorted(
        p for p in root.rglob("*.py") if not SKIPPED_STDLIB_FOLDERS & set(p.relative_to(root).parts)
    )
    for path in files:
        for doc in _docstrings(path):
            for paragraph in doc.split("\n\n"):
                text = _SPACE.sub(" ", paragraph).strip()
                if not min_chars <= len(text) <= max_chars or text.startswith(">>>"):
                    continue
                if sum(len(w) for w in _PROSE.findall(text)) < 0.5 * len(text):
                    continue
                seen.setdefault(text)
    return list(seen)


def train_tokenizer(texts: Sequence[str], vocab_size: int = 1024) -> object:
    """A byte-level BPE tokenizer (``tokenizers``) trained on ``texts``; ``<pad>`` is id 0.

    Byte-level: any text can be encoded (no unknown token). Deterministic for the same texts.

    Args:
        texts: the training corpus; vocab_size: the vocabulary size, special token included.

    Returns:
        A ``tokenizers.Tokenizer`` (save it with ``.save(path)``: JSON).

    Raises:
        ImportError: ``tokenizers`` is not installed.
        ValueError: no texts.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not texts:
        raise ValueError("train_tokenizer needs at least one text")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def encode_passages(
    tokenizer: object, texts: Sequence[str], max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of each text, truncated to ``max_len`` and right-padded with ``<pad>`` (id 0).

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` with ``<pad>`` at id 0 (:func:`train_tokenizer`).
        texts: n texts; max_len: T, the tokens kept per text.

    Returns:
        ``(ids, attention_mask)``: `(n, T)` int64 token ids and `(n, T)` int64 1 for real tokens, 0 for
        padding.

    Raises:
        ValueError: a text encodes to no token.
    """
    encodings = tokenizer.encode_batch(list(texts))  # type: ignore[attr-defined]
    ids = np.zeros((len(texts), max_len), np.int64)
    mask = np.zeros((len(texts), max_len), np.int64)
    for row, encoding in enumerate(encodings):
        tokens = encoding.ids[:max_len]
        if not tokens:
            raise ValueError(f"text {row} encodes to no token: {texts[row]!r}")
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)
