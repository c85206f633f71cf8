"""The load benchmark's requests: the index under load, the request mix, how each is drawn and checked.

Shared by the driver (:mod:`benchmarks.load`) and the locust users (``benchmarks/locustfile.py``, run in a
locust subprocess). It imports neither torch nor the indexer, so that the load generator's process stays
small: the choices of score, direction and objective come in as their string values (the driver reads
them from :mod:`indexer.enums`).

Request kinds (:data:`KINDS`) and what a complete answer holds:

- ``stored_id``: ``POST /v1/indexes/{name}/attributions`` for a random stored query id with a random score,
  direction and top_k; at most top_k results;
- ``raw_input``: the same for a raw model input (JSON-encoded once, up front); at most top_k results;
- ``subset``: ``POST /v1/indexes/{name}/attributions/subset`` (greedy group attribution of 5-20 members
  from 100-200 candidates); exactly ``size`` members;
- ``list_indexes``: ``GET /v1/indexes``; an ``indexes`` list;
- ``batch`` (the optional batch phase, not in the mix): ``POST /v1/indexes/{name}/attributions:batch``
  with ``{"requests": [...]}`` of stored_id bodies; one result per item, each ``{"status": 200,
  "response": ...}`` or ``{"status": 4xx/5xx, "error": {"detail": ...}}``.
"""

from __future__ import annotations

import ipaddress
import json
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

__all__ = [
    "BATCH_KIND",
    "DEFAULT_MIX",
    "KINDS",
    "PLAN_ENV",
    "Planned",
    "RequestMaker",
    "Target",
    "batch_item_statuses",
    "effective_mix",
    "incomplete",
    "is_loopback_url",
    "pick_target",
]

KINDS = ("stored_id", "raw_input", "subset", "list_indexes")
DEFAULT_MIX: dict[str, float] = {"stored_id": 0.55, "raw_input": 0.30, "subset": 0.05, "list_indexes": 0.10}
"""Share of each request kind (renormalised over the kinds the target index can answer)."""

BATCH_KIND = "batch"
"""The kind (and locust request name) of the batch phase's requests."""

PLAN_ENV = "INFOTRACE_LOAD_PLAN"
"""Environment variable naming the JSON plan file that the driver writes for the locustfile."""

TOP_KS = (1, 5, 10, 20, 50)
SUBSET_SIZES = (5, 10, 20)
SUBSET_CANDIDATES = (100, 200)
PREFERRED_INDEX = "digits"


def is_loopback_url(url: str) -> bool:
    """Whether ``url`` is an http(s) URL whose host is a loopback address (or ``localhost``)."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        return False
    if parsed.scheme not in ("http", "https") or not parsed.host:
        return False
    host = parsed.host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Target:
    """The index under load, as the service lists it (``GET /v1/indexes``).

    Attributes:
        name: the index name.
        n_train: training examples (the largest top_k, size and candidates sent).
        n_query: stored queries (ids ``0 .. n_query - 1``; 0: no stored_id requests).
        k: feature dimension, for the report.
        raw_inputs: whether the index answers raw-input queries.
        input_shape: one raw input's shape, when the index has a model.
    """

    name: str
    n_train: int
    n_query: int
    k: int | None
    raw_inputs: bool
    input_shape: list[int] | None


@dataclass(frozen=True)
class Planned:
    """One request to send.

    Attributes:
        kind: one of :data:`KINDS` or :data:`BATCH_KIND` (locust's request name).
        method: ``GET`` or ``POST``.
        path: the URL path.
        body: the JSON body, already encoded (None for a GET).
        expect: at most this many results (attributions), exactly this many members (subset) or batch
            results; 0 for the index list.
        item_top_ks: for a batch, each item's top_k (its response has at most that many results).
    """

    kind: str
    method: str
    path: str
    body: bytes | None
    expect: int
    item_top_ks: tuple[int, ...] = ()


def pick_target(indexes: list[dict[str, Any]], name: str | None) -> Target:
    """The index to load: ``name``, else ``digits`` when served, else the first ready one.

    Args:
        indexes: the ``indexes`` list of ``GET /v1/indexes``.
        name: the index asked for, or None.

    Raises:
        RuntimeError: no such ready index.
    """
    ready = {entry["name"]: entry for entry in indexes if entry.get("ready")}
    if not ready:
        raise RuntimeError(f"the service has no ready index: {indexes}")
    chosen = name or (PREFERRED_INDEX if PREFERRED_INDEX in ready else sorted(ready)[0])
    if chosen not in ready:
        raise RuntimeError(f"index {chosen!r} is not served (ready: {sorted(ready)})")
    entry = ready[chosen]
    shape = (entry.get("model") or {}).get("input_shape")
    return Target(
        name=chosen,
        n_train=int(entry["n_train"]),
        n_query=int(entry["n_query"]),
        k=entry.get("k"),
        raw_inputs=bool(entry.get("raw_input_queries")),
        input_shape=None if shape is None else [int(d) for d in shape],
    )


def effective_mix(mix: Mapping[str, float], target: Target, n_inputs: int) -> dict[str, float]:
    """``mix`` restricted to the kinds ``target`` can answer, renormalised to sum to 1.

    Args:
        mix: kind -> non-negative weight (kinds of :data:`KINDS`).
        target: the index under load.
        n_inputs: raw inputs available (0: no ``raw_input`` requests).

    Returns:
        kind -> share, the shares summing to 1, kinds of weight 0 left out.

    Raises:
        ValueError: an unknown kind, a negative weight, or nothing left to send.
    """
    unknown = set(mix) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown request kinds {sorted(unknown)}; known: {list(KINDS)}")
    if any(w < 0 for w in mix.values()):
        raise ValueError(f"mix weights must be non-negative: {dict(mix)}")
    usable = dict(mix)
    if target.n_query == 0:
        usable.pop("stored_id", None)
    if not target.raw_inputs or n_inputs == 0:
        usable.pop("raw_input", None)
    if target.n_query == 0 and "raw_input" not in usable:
        usable.pop("subset", None)
    total = sum(usable.values())
    if total <= 0:
        raise ValueError(f"no request kind of {dict(mix)} can be sent to index {target.name!r}")
    return {kind: weight / total for kind, weight in usable.items() if weight > 0}


class RequestMaker:
    """Draws requests of the mix for one index.

    Args:
        target: the index under load.
        encoded_inputs: raw model inputs, each already JSON-encoded (a nested list of floats).
        mix: kind -> weight (see :data:`DEFAULT_MIX`); restricted with :func:`effective_mix`.
        scores: the score values to draw from (``indexer.enums.Score``).
        directions: the direction values (``indexer.enums.Direction``).
        objectives: the subset objective values (``indexer.enums.Objective``).

    Raises:
        ValueError: see :func:`effective_mix`; an empty list of choices.
    """

    def __init__(
        self,
        target: Target,
        encoded_inputs: Sequence[str],
        mix: Mapping[str, float],
        scores: Sequence[str],
        directions: Sequence[str],
        objectives: Sequence[str],
    ) -> None:
        if not scores or not directions or not objectives:
            raise ValueError("scores, directions and objectives must each list at least one value")
        self.target = target
        self.encoded_inputs = list(encoded_inputs)
        self.mix = effective_mix(mix, target, len(self.encoded_inputs))
        self.kinds = list(self.mix)
        self.weights = [self.mix[kind] for kind in self.kinds]
        self.scores, self.directions, self.objectives = list(scores), list(directions), list(objectives)
        self.attributions = f"/v1/indexes/{target.name}/attributions"

    def _query(self, rng: random.Random, stored: bool) -> str:
        if stored:
            return json.dumps({"id": rng.randrange(self.target.n_query)})
        return '{"input": ' + rng.choice(self.encoded_inputs) + "}"

    def _attribution_body(self, rng: random.Random, stored: bool) -> tuple[bytes, int]:
        top_k = min(rng.choice(TOP_KS), self.target.n_train)
        score, direction = rng.choice(self.scores), rng.choice(self.directions)
        body = (
            f'{{"query": {self._query(rng, stored)}, "top_k": {top_k}, '
            f'"score": "{score}", "direction": "{direction}"}}'
        )
        return body.encode(), top_k

    def make(self, kind: str, rng: random.Random) -> Planned:
        """One request of ``kind`` with random parameters drawn from ``rng``.

        Raises:
            ValueError: ``kind`` is not one of :data:`KINDS`.
        """
        n = self.target.n_train
        if kind == "list_indexes":
            return Planned(kind, "GET", "/v1/indexes", None, 0)
        if kind in ("stored_id", "raw_input"):
            body, top_k = self._attribution_body(rng, kind == "stored_id")
            return Planned(kind, "POST", self.attributions, body, top_k)
        if kind == "subset":
            size = min(rng.choice(SUBSET_SIZES), n)
            candidates = max(size, min(rng.choice(SUBSET_CANDIDATES), n))
            stored = self.target.n_query > 0 and (not self.encoded_inputs or rng.random() < 0.7)
            objective = rng.choice(self.objectives)
            text = (
                f'{{"query": {self._query(rng, stored)}, "size": {size}, "candidates": {candidates}, '
                f'"objective": "{objective}"}}'
            )
            return Planned(kind, "POST", self.attributions + "/subset", text.encode(), size)
        raise ValueError(f"unknown request kind {kind!r}; known: {list(KINDS)}")

    def draw(self, rng: random.Random) -> Planned:
        """A request of a kind drawn from the mix."""
        return self.make(rng.choices(self.kinds, self.weights)[0], rng)

    def batch(self, rng: random.Random, size: int) -> Planned:
        """A batch of ``size`` stored-id attribution requests, each body exactly as :meth:`make` writes it.

        Raises:
            ValueError: ``size < 1`` or an index without stored queries.
        """
        if size < 1:
            raise ValueError(f"a batch needs at least one item, got size {size}")
        if self.target.n_query == 0:
            raise ValueError(f"index {self.target.name!r} has no stored queries to batch")
        items = [self._attribution_body(rng, stored=True) for _ in range(size)]
        body = b'{"requests": [' + b", ".join(item for item, _ in items) + b"]}"
        top_ks = tuple(top_k for _, top_k in items)
        return Planned(BATCH_KIND, "POST", self.attributions + ":batch", body, size, top_ks)


def _incomplete_batch(planned: Planned, payload: dict[str, Any]) -> str | None:
    results = payload.get("results")
    if not isinstance(results, list) or len(results) != planned.expect:
        return f"expected a list of {planned.expect} batch results"
    for i, (item, top_k) in enumerate(zip(results, planned.item_top_ks, strict=True)):
        if not isinstance(item, dict) or not isinstance(item.get("status"), int):
            return f"batch result {i} has no integer 'status'"
        if item["status"] == 200:
            response = item.get("response")
            found = response.get("results") if isinstance(response, dict) else None
            if not isinstance(found, list) or len(found) > top_k:
                return f"batch result {i}: expected a response of at most {top_k} results"
        elif not isinstance(item.get("error"), dict):
            return f"batch result {i} (status {item['status']}) has no 'error' object"
    return None


def incomplete(planned: Planned, payload: Any) -> str | None:
    """Why a 200 body does not answer ``planned`` (None when it does).

    A batch whose items failed is complete when each failed item says why (``error``): the items' statuses
    are counted apart (:func:`batch_item_statuses`).
    """
    if not isinstance(payload, dict):
        return "body is not a JSON object"
    if planned.kind == "list_indexes":
        return None if isinstance(payload.get("indexes"), list) else "no 'indexes' list"
    if planned.kind == BATCH_KIND:
        return _incomplete_batch(planned, payload)
    if planned.kind == "subset":
        members = payload.get("members")
        if not isinstance(members, list) or len(members) != planned.expect:
            return f"expected {planned.expect} subset members"
        return None
    results = payload.get("results")
    if not isinstance(results, list) or len(results) > planned.expect:
        # fewer than top_k is valid: a direction with fewer examples of that sign
        return f"expected a list of at most {planned.expect} results"
    return None


def batch_item_statuses(payload: dict[str, Any]) -> tuple[dict[str, int], str | None]:
    """The items of a complete batch answer (:func:`incomplete` gave None), counted by status.

    Returns:
        status (a string, e.g. ``"200"``) -> items, and the first failed item's status and detail (None
        when every item was answered with 200).
    """
    statuses: Counter[str] = Counter()
    first_error = None
    for item in payload["results"]:
        statuses[str(item["status"])] += 1
        if item["status"] != 200 and first_error is None:
            first_error = f"item status {item['status']}: {str(item['error'].get('detail'))[:300]}"
    return dict(statuses), first_error
