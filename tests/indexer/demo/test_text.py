"""The text demo's data: standard-library docstring passages, the BPE tokenizer, padded token ids."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from indexer.demo.text import encode_passages, stdlib_passages, train_tokenizer


def test_passages_are_prose_from_docstrings_only(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "tests").mkdir()
    long = "This function returns the number of items that were read from the stream before it closed."
    (tmp_path / "pkg" / "a.py").write_text(
        f'"""{long}\n\n>>> a_doctest_line_long_enough_to_pass_the_length_check_but_still_code(1, 2, 3)\n"""\n'
        f'def f():\n    """{long}"""\n# {long}\nx = "{long} not a docstring either"\n'
    )
    (tmp_path / "tests" / "b.py").write_text(f'"""{long} (in a test folder)"""\n')
    (tmp_path / "pkg" / "broken.py").write_text("def (:\n")
    assert stdlib_passages(root=tmp_path) == [long]  # kept once; doctests, comments, tests, bad files not
    with pytest.raises(FileNotFoundError):
        stdlib_passages(root=tmp_path / "absent")


def test_the_real_standard_library_gives_thousands_of_passages_and_a_tokenizer() -> None:
    passages = stdlib_passages()
    assert len(passages) > 3000 and all(80 <= len(p) <= 400 for p in passages)
    tokenizer = train_tokenizer(passages[:500], vocab_size=300)
    assert tokenizer.get_vocab_size() == 300 and tokenizer.token_to_id("<pad>") == 0
    ids, mask = encode_passages(tokenizer, passages[:20], max_len=16)
    assert ids.shape == mask.shape == (20, 16) and ids.dtype == torch.int64
    lengths = mask.sum(1)
    assert torch.all(ids[mask == 0] == 0) and torch.all(lengths >= 1)
    short = passages[0][:30]
    one, one_mask = encode_passages(tokenizer, [short], max_len=64)
    assert tokenizer.decode(one[0, : int(one_mask.sum())].tolist()) == short  # byte-level: lossless
