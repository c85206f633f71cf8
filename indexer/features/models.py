"""Model specs: how the service rebuilds the network an index was made from.

A :class:`ModelSpec` names a factory and its keyword arguments; the manifest records it and the service
calls it to featurize raw queries with the same architecture (weights come from the index's checkpoint).
Built-in factories: ``mlp``, ``logistic_regression``, ``cnn`` and ``gpt`` (a small causal language model,
:mod:`indexer.features.transformer`); others register with :func:`register_model`
or are named as an import path ``"package.module:function"``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from indexer.features.transformer import gpt

__all__ = [
    "ModelSpec",
    "mlp",
    "logistic_regression",
    "cnn",
    "register_model",
    "build_model",
    "load_checkpoint",
    "save_checkpoint",
    "tied_names",
]


def mlp(in_features: int, hidden: list[int], out_features: int) -> nn.Module:
    """A ReLU multilayer perceptron on flat inputs `(batch, in_features)` -> `(batch, out_features)`.

    Args:
        in_features: input width; hidden: widths of the hidden layers; out_features: number of outputs.
    """
    widths = [in_features, *hidden, out_features]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def logistic_regression(in_features: int, out_features: int) -> nn.Module:
    """Multinomial logistic regression `(batch, in_features)` -> `(batch, out_features)` logits."""
    return nn.Sequential(nn.Linear(in_features, out_features))


def cnn(
    side: int = 28,
    channels: list[int] | tuple[int, ...] = (16, 32),
    hidden: int = 128,
    out_features: int = 10,
    batch_norm: bool = True,
) -> nn.Module:
    """A small image CNN on flat grayscale inputs `(batch, side * side)` -> `(batch, out_features)` logits.

    Each entry of ``channels`` is a block: 3 x 3 convolution (padding 1), BatchNorm2d (when ``batch_norm``),
    ReLU, 2 x 2 max-pooling; then a hidden ReLU Linear layer and the output layer. With the defaults on
    28 x 28 digits: 207,018 parameters.

    Args:
        side: image height and width in pixels (a multiple of ``2 ** len(channels)``).
        channels: output channels of each convolution block.
        hidden: width of the hidden Linear layer; out_features: number of classes.
        batch_norm: a BatchNorm2d after each convolution.

    Raises:
        ValueError: ``side`` is not divisible by ``2 ** len(channels)``, or no channels.
    """
    if not channels or side % (2 ** len(channels)):
        raise ValueError(f"side {side} must be divisible by 2 ** {len(channels)} (one halving per block)")
    layers: list[nn.Module] = [nn.Unflatten(1, (1, side, side))]
    for c_in, c_out in zip([1, *channels[:-1]], channels, strict=True):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1)]
        layers += [nn.BatchNorm2d(c_out)] if batch_norm else []
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
    final = side // 2 ** len(channels)
    layers += [nn.Flatten(), nn.Linear(channels[-1] * final * final, hidden), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(hidden, out_features))


_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "logistic_regression": logistic_regression,
    "cnn": cnn,
    "gpt": gpt,
}


def register_model(name: str, factory: Callable[..., nn.Module]) -> None:
    """Register a model factory under ``name`` so that a manifest can name it.

    Raises:
        ValueError: the name is taken by another factory or contains ':' (reserved for import paths).
    """
    if ":" in name:
        raise ValueError(f"model name {name!r} must not contain ':' (reserved for import paths)")
    if _FACTORIES.get(name, factory) is not factory:
        raise ValueError(f"model name {name!r} is already registered")
    _FACTORIES[name] = factory


@dataclass(frozen=True)
class ModelSpec:
    """The architecture of an indexed model.

    Attributes:
        factory: a registered name (``"mlp"``) or an import path ``"package.module:function"``.
        kwargs: JSON-serialisable keyword arguments of the factory.
    """

    factory: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The manifest entry."""
        return {"factory": self.factory, "kwargs": dict(self.kwargs)}


def build_model(spec: ModelSpec) -> nn.Module:
    """Instantiate the architecture of ``spec`` (random weights).

    Raises:
        ValueError: unknown factory name, an import path that does not resolve, or bad kwargs.
    """
    if ":" in spec.factory:
        module_name, _, attr = spec.factory.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot import model factory {spec.factory!r}: {exc}") from exc
    else:
        if spec.factory not in _FACTORIES:
            raise ValueError(
                f"unknown model factory {spec.factory!r}; registered: {sorted(_FACTORIES)} (a custom one "
                "is registered by its plugin module: list it in INFOTRACE_PLUGINS, or --plugin for "
                "infotrace-index)"
            )
        factory = _FACTORIES[spec.factory]
    try:
        model = factory(**spec.kwargs)
    except TypeError as exc:
        raise ValueError(f"bad arguments {spec.kwargs!r} for model factory {spec.factory!r}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ValueError(f"model factory {spec.factory!r} returned {type(model).__name__}, not an nn.Module")
    return model


def load_checkpoint(model: nn.Module, path: Path) -> None:
    """Load weights into ``model`` without unpickling anything.

    ``.safetensors`` files are read with safetensors; anything else with ``torch.load(weights_only=True)``,
    which refuses arbitrary pickled objects. A file that holds one name of weights the model ties (shares)
    under several names (:func:`save_checkpoint`, safetensors' ``save_model``, transformers'
    ``save_pretrained``: the tied input and output embeddings of a language model) loads them all.

    Args:
        model: the architecture; its state dict keys and shapes must match.
        path: the checkpoint file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a loadable state dict, keys/shapes do not match the model, or it holds
            different values for weights the model ties; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors and torch raise many types for a bad file
        raise ValueError(
            f"checkpoint {path} is not a safetensors file or a weights-only torch state dict: {exc}"
        ) from exc
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, expected a state dict")
    state = dict(state)
    for group in tied_names(model):
        present = [name for name in group if name in state]
        if not present:
            continue  # missing altogether: load_state_dict names it
        first = state[present[0]]
        for name in present[1:]:
            if not (isinstance(state[name], torch.Tensor) and torch.equal(state[name], first)):
                raise ValueError(
                    f"checkpoint {path} holds different values for {present[0]!r} and {name!r}, which the "
                    "model ties (one shared tensor)"
                )
        for name in group:
            state.setdefault(name, first)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"checkpoint {path} does not match the model: {exc}") from exc


def tied_names(model: nn.Module) -> list[tuple[str, ...]]:
    """The groups of state-dict names under which ``model`` holds one shared tensor (tied weights).

    Returns:
        Each group of two or more names, in state-dict order (the first is the one
        :func:`save_checkpoint` keeps).
    """
    groups: dict[tuple[Any, ...], list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(_identity(tensor), []).append(name)
    return [tuple(names) for names in groups.values() if len(names) > 1]


def _identity(tensor: torch.Tensor) -> tuple[Any, ...]:
    """What makes two state-dict entries the same tensor: the same memory, viewed the same way."""
    return (
        tensor.device,
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tensor.stride(),
        tensor.dtype,
    )


def save_checkpoint(model: nn.Module, path: Path) -> None:
    """Write ``model``'s state dict as safetensors (contiguous CPU tensors).

    A tensor the model holds under several names (tied input and output embeddings) is written once, under
    its first name, the others recorded in the file's metadata as safetensors' ``save_model`` does
    (``{dropped_name: kept_name}``); :func:`load_checkpoint` restores them. Tensors that overlap in memory
    without being the same (views of one buffer) are written as copies.

    Args:
        model: the network (on any device).
        path: the ``.safetensors`` file to write.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    kept: dict[tuple[Any, ...], str] = {}
    storages: set[tuple[Any, ...]] = set()
    for name, tensor in model.state_dict().items():
        identity = _identity(tensor)
        if identity in kept:
            aliases[name] = kept[identity]
            continue
        kept[identity] = name
        storage = identity[:2]
        value = tensor.detach().cpu().contiguous()
        # a second view of memory already written would share it in the file, which safetensors refuses
        shares = storage in storages and value.data_ptr() == tensor.data_ptr()
        tensors[name] = value.clone() if shares else value
        storages.add(storage)
    save_file(tensors, str(path), metadata=aliases or None)
