"""The batch route ``POST /v1/indexes/{name}/attributions:batch`` against the single route, item by item, for
every query kind, with invalid items mixed in (the contract: per-item errors, each the status and detail the
single route answers; a whole-batch 422 only for a bad envelope)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from indexer.data import Dataset
from indexer.enums import Direction, Score
from service.app import create_app
from service.core.settings import Settings
from tests.conftest import TextLM

BATCH = "/v1/indexes/{name}/attributions:batch"
SINGLE = "/v1/indexes/{name}/attributions"


@pytest.fixture(scope="module")
def client(index_root: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(index_root=index_root, max_batch=64))) as c:
        yield c


def comparable(response: dict[str, Any]) -> dict[str, Any]:
    """A response without what may differ between the routes: timings, and the depth the exact scan
    reached (the batched scan bounds in float32, the single one in float16)."""
    return {key: value for key, value in response.items() if key not in ("timings", "candidates_searched")}


def item_bodies(test_digits: Dataset, k: int) -> list[dict[str, Any]]:
    scores, directions = list(Score), list(Direction)
    rng = np.random.default_rng(0)
    bodies = []
    for i in range(18):
        kind = i % 3
        query: dict[str, Any] = (
            {"id": i}
            if kind == 0
            else {"input": test_digits.inputs[i].tolist()}
            if kind == 1
            else {"feature": (rng.standard_normal(k) * 0.1).tolist()}
        )
        if i == 4:
            query["target"] = 3
        bodies.append(
            {
                "query": query,
                "top_k": (1, 5, 10, 20)[i % 4],
                "score": scores[i % len(scores)].value,
                "direction": directions[(i // 3) % 3].value,
                **({"candidates": 7} if i % 5 == 0 else {}),
            }
        )
    return bodies


def test_each_item_gets_what_the_single_route_answers(client: TestClient, test_digits: Dataset) -> None:
    k = client.get("/v1/indexes/digits").json()["k"]
    bodies = item_bodies(test_digits, k)
    bad = [
        {"query": {"id": 10**6}},  # 404 from the single route
        {"query": {"input": [0.5, 0.5]}},  # 422: wrong shape
        {"query": {"id": 1}, "top_k": "ten"},  # 422: validation
        {"query": {"id": 1}, "nprobe": 4},  # 422: a knob the exact scan does not take
        {"query": {"id": 1}, "top_k": 10**9},  # 422: beyond the limits
    ]
    mixed = bodies[:6] + bad + bodies[6:]
    response = client.post(BATCH.format(name="digits"), json={"requests": mixed})
    assert response.status_code == 200, response.text
    payload = response.json()
    assert payload["index"] == "digits" and payload["answered"] == len(bodies)
    timings = payload["timings"]
    assert timings["total_ms"] >= timings["featurize_ms"] > 0 and timings["retrieve_ms"] > 0
    assert len(payload["results"]) == len(mixed)
    for i, (body, item) in enumerate(zip(mixed, payload["results"], strict=True)):
        single = client.post(SINGLE.format(name="digits"), json=body)
        assert item["status"] == single.status_code, (i, body, item)
        if single.status_code != 200:
            assert item["response"] is None
            expected = single.json()["detail"]
            if isinstance(expected, list):  # validation errors: located inside the batch's body
                for error in expected:
                    assert error["loc"][0] == "body"
                    error["loc"] = ["body", "requests", i, *error["loc"][1:]]
            assert item["error"]["detail"] == expected
            continue
        want, got = single.json(), item["response"]
        assert item["error"] is None
        if "input" not in body["query"]:  # stored ids and features: the same answer
            assert comparable(got) == comparable(want)
            continue
        # a raw input is featurized in a batch: float32 rounding, then the float16 storage rounding
        assert [r["id"] for r in got["results"]] == [r["id"] for r in want["results"]]
        np.testing.assert_allclose(
            [r["signed_score"] for r in got["results"]],
            [r["signed_score"] for r in want["results"]],
            rtol=1e-3,
        )
        assert got["query"]["prediction"] == want["query"]["prediction"]


def test_a_text_index_answers_text_items_as_the_single_route(text_lm: TextLM) -> None:
    with TestClient(create_app(Settings(index_root=text_lm.root))) as client:
        bodies = [
            {"query": {"text": text_lm.texts[0][:20], "continuation": text_lm.texts[0][20:30]}, "top_k": 3},
            {"query": {"id": 1}, "top_k": 4},
            {"query": {"text": ""}, "top_k": 3},
        ]
        payload = client.post(BATCH.format(name="lm"), json={"requests": bodies}).json()
        assert [item["status"] for item in payload["results"]][:2] == [200, 200]
        for body, item in zip(bodies, payload["results"], strict=True):
            single = client.post(SINGLE.format(name="lm"), json=body)
            assert item["status"] == single.status_code
            if single.status_code == 200:
                assert comparable(item["response"]) == comparable(single.json())


def test_the_envelope_is_checked_as_a_whole(client: TestClient) -> None:
    url = BATCH.format(name="digits")
    empty = client.post(url, json={"requests": []})
    assert empty.status_code == 422 and empty.json()["detail"][0]["loc"] == ["body", "requests"]
    too_many = client.post(url, json={"requests": [{"query": {"id": 0}}] * 65})
    assert too_many.status_code == 422 and "INFOTRACE_MAX_BATCH" in too_many.json()["detail"]
    assert client.post(url, json={"requests": {"query": {"id": 0}}}).status_code == 422
    assert client.post(url, json={"requests": [{"query": {"id": 0}}], "extra": 1}).status_code == 422
    assert client.post(url, json=[{"query": {"id": 0}}]).status_code == 422
    assert (
        client.post(BATCH.format(name="nope"), json={"requests": [{"query": {"id": 0}}]}).status_code == 404
    )
    # every item bad: still a 200 with each item's error
    all_bad = client.post(url, json={"requests": [{"query": {}}, 5, None]}).json()
    assert all_bad["answered"] == 0 and [r["status"] for r in all_bad["results"]] == [422, 422, 422]


def test_inputs_featurized_alone_answer_bit_for_bit(index_root: Path, test_digits: Dataset) -> None:
    """INFOTRACE_BATCH_INPUTS_TOGETHER=false: every raw-input item is the single route's answer exactly."""
    settings = Settings(index_root=index_root, max_batch=64, batch_inputs_together=False)
    with TestClient(create_app(settings)) as alone:
        bodies = [
            {"query": {"input": test_digits.inputs[i].tolist()}, "top_k": 20, "score": score.value}
            for i, score in zip(range(10), [*Score, *Score], strict=True)
        ]
        payload = alone.post(BATCH.format(name="digits"), json={"requests": bodies}).json()
        for body, item in zip(bodies, payload["results"], strict=True):
            want = alone.post(SINGLE.format(name="digits"), json=body).json()
            assert comparable(item["response"]) == comparable(want)


def test_stored_ids_agree_bit_for_bit_whatever_the_depth(client: TestClient) -> None:
    """The batched scan and the single one deepen to other depths and rerank other row sets; an example's
    exact scores do not depend on the set it was reranked in, so the answers are the same bits."""
    bodies = [
        {"query": {"id": q}, "top_k": top_k, "candidates": candidates, "score": s.value, "direction": d.value}
        for q in (0, 5)
        for s in Score
        for d in Direction
        for top_k, candidates in ((50, 1), (7, 3))
    ]
    for start in range(0, len(bodies), 64):
        part = bodies[start : start + 64]
        payload = client.post(BATCH.format(name="digits"), json={"requests": part}).json()
        for body, item in zip(part, payload["results"], strict=True):
            want = client.post(SINGLE.format(name="digits"), json=body).json()
            assert comparable(item["response"]) == comparable(want), body
