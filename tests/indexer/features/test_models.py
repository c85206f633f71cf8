"""Checkpoints: tied (shared) weights written once and restored, bad files refused naming the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_model
from torch import nn

from indexer.build import build_index
from indexer.config import IndexConfig
from indexer.data import Dataset
from indexer.features.language import LanguageModelMargin, causal_lm_targets
from indexer.features.models import load_checkpoint, save_checkpoint, tied_names
from indexer.store.layout import CHECKPOINT_FILE


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    return all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_tied_weights_round_trip(tmp_path: Path, tiny_lm) -> None:
    model = tiny_lm(tied=True, seed=0)
    assert tied_names(model) == [("embed.weight", "head.weight")]
    path = tmp_path / "tied.safetensors"
    save_checkpoint(model, path)
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == ["embed.weight", "mix.bias", "mix.weight"]
        assert f.metadata() == {"head.weight": "embed.weight"}
    fresh = tiny_lm(tied=True, seed=1)
    assert not _same_state(model, fresh)
    load_checkpoint(fresh, path)
    assert _same_state(model, fresh) and fresh.head.weight is fresh.embed.weight  # still one tensor
    # safetensors' own save_model and a torch state dict (both names) load the same
    for other in (tmp_path / "st.safetensors", tmp_path / "sd.pt"):
        if other.suffix == ".pt":
            torch.save(model.state_dict(), other)
        else:
            save_model(model, str(other))
        again = tiny_lm(tied=True, seed=2)
        load_checkpoint(again, other)
        assert _same_state(model, again)


def test_untied_checkpoints_carry_no_metadata_and_views_are_copied(tmp_path: Path, tiny_lm) -> None:
    path = tmp_path / "plain.safetensors"
    save_checkpoint(tiny_lm(tied=False), path)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() is None and "head.weight" in f.keys()

    class Views(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            base = torch.arange(6.0)
            self.register_buffer("a", base[:3])
            self.register_buffer("b", base[3:])

    views = tmp_path / "views.safetensors"
    save_checkpoint(Views(), views)
    loaded = Views()
    loaded.a.zero_()
    loaded.b.zero_()
    load_checkpoint(loaded, views)
    assert loaded.a.tolist() == [0.0, 1.0, 2.0] and loaded.b.tolist() == [3.0, 4.0, 5.0]


def test_bad_checkpoints_are_refused_naming_the_file(tmp_path: Path, tiny_lm) -> None:
    model = tiny_lm(tied=True)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 40)
    with pytest.raises(ValueError, match=f"checkpoint {garbage} is not a safetensors file"):
        load_checkpoint(model, garbage)
    untied = tmp_path / "untied.pt"
    torch.save(tiny_lm(tied=False).state_dict(), untied)  # embed and head differ; head has a bias
    with pytest.raises(ValueError, match=f"checkpoint {untied} holds different values for 'embed.weight'"):
        load_checkpoint(model, untied)
    smaller = tmp_path / "smaller.safetensors"
    save_checkpoint(tiny_lm(tied=True, dim=4), smaller)
    with pytest.raises(ValueError, match=f"checkpoint {smaller} does not match the model"):
        load_checkpoint(model, smaller)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(model, tmp_path / "nope.safetensors")


def test_an_index_of_a_tied_model_keeps_a_loadable_checkpoint(tmp_path: Path, tiny_lm) -> None:
    model = tiny_lm(tied=True, vocab=11)
    ids = torch.randint(0, 11, (10, 5), generator=torch.Generator().manual_seed(0))
    source = tmp_path / "source.safetensors"
    save_checkpoint(model, source)
    out = build_index(
        tiny_lm(tied=True, vocab=11, seed=3),  # its weights come from the checkpoint
        LanguageModelMargin(11),
        Dataset(ids, causal_lm_targets(ids)),
        tmp_path / "tied",
        checkpoint=source,
        config=IndexConfig(k=12),
        progress=False,
    )
    restored = tiny_lm(tied=True, vocab=11, seed=4)
    load_checkpoint(restored, out / CHECKPOINT_FILE)
    assert _same_state(model, restored)
