"""Examples and stored queries as JSON and PNG, the GET forms of the queries, the dashboard's files."""

from __future__ import annotations

import io
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from indexer.data import Dataset
from indexer.enums import Direction, Objective, Score
from indexer.store.layout import MANIFEST_CHECKSUM_FIELD, MANIFEST_FILE
from indexer.store.manifest import manifest_checksum
from indexer.store.reader import load_index
from service.api.routes.dashboard import STATIC_DIR
from service.api.routes.examples import SCALING_HEADER
from service.app import create_app
from service.core.settings import Settings
from service.render import DEFAULT_SCALE, render_png, to_gray8

BASE = "/v1/indexes/digits"


@pytest.fixture(scope="module")
def served_root(index_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small digits index, plus a copy named ``plain`` whose manifest says its inputs are not images."""
    root = tmp_path_factory.mktemp("served")
    shutil.copytree(index_root / "digits", root / "digits")
    shutil.copytree(index_root / "digits", root / "plain")
    manifest_path = root / "plain" / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["model"]["image_shape"] = None
    manifest[MANIFEST_CHECKSUM_FIELD] = manifest_checksum(manifest)  # a deliberate edit, signed again
    manifest_path.write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def client(served_root: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(index_root=served_root))) as c:
        yield c


def decode_png(content: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(content))
    assert image.format == "PNG" and image.mode == "L"
    return np.asarray(image)


def without_timings(body: dict) -> dict:
    return {key: value for key, value in body.items() if key != "timings"}


# ---- JSON -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("example_id", [0, 17, 599])
def test_training_example_json(client: TestClient, index_root: Path, example_id: int) -> None:
    data = load_index(index_root / "digits")
    response = client.get(f"{BASE}/examples/{example_id}")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["index"] == "digits" and body["split"] == "train" and body["id"] == example_id
    assert body["label"] == int(data.examples["label"][example_id])
    assert body["prediction"] == int(data.examples["prediction"][example_id])
    assert np.isclose(body["output"], data.examples["output"][example_id])
    assert np.isclose(body["posterior_variance"], data.examples["h"][example_id])
    assert len(body["probabilities"]) == 10 and np.isclose(sum(body["probabilities"]), 1.0)
    assert set(body["metadata"]) == {"source_row"}  # the label is returned once, as `label`
    assert body["input_shape"] == [784] and body["image_shape"] == [28, 28]
    assert body["image_url"] == f"{BASE}/examples/{example_id}/image.png"
    assert body["input"] is None
    assert client.get(body["image_url"]).status_code == 200


def test_stored_query_json_and_input(client: TestClient, test_digits: Dataset) -> None:
    body = client.get(f"{BASE}/queries/7", params={"include_input": "true"}).json()
    assert body["split"] == "query" and body["id"] == 7
    assert body["label"] == int(test_digits.targets[7])
    assert body["posterior_variance"] is None  # h_i is a training-set quantity
    assert body["image_url"] == f"{BASE}/queries/7/image.png"
    assert np.array_equal(np.asarray(body["input"], dtype=np.float32), test_digits.inputs[7].numpy())
    # the copied input, explained with its label, gives the stored query's attribution
    by_input = client.post(
        f"{BASE}/attributions", json={"query": {"input": body["input"], "target": body["label"]}}
    ).json()
    by_id = client.post(f"{BASE}/attributions", json={"query": {"id": 7}}).json()
    assert [r["id"] for r in by_input["results"]] == [r["id"] for r in by_id["results"]]


def test_training_input_is_returned(client: TestClient, index_root: Path) -> None:
    data = load_index(index_root / "digits")
    body = client.get(f"{BASE}/examples/42", params={"include_input": True}).json()
    assert np.array_equal(np.asarray(body["input"], dtype=np.float32), data.inputs[42])


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("examples/600", "no training example with id 600; valid ids are 0..599"),
        ("examples/-1", "no training example with id -1; valid ids are 0..599"),
        ("examples/600/image.png", "valid ids are 0..599"),
        ("queries/80", "no stored query with id 80; valid ids are 0..79"),
        ("queries/80/image.png", "valid ids are 0..79"),
    ],
)
def test_unknown_ids_are_404(client: TestClient, path: str, message: str) -> None:
    response = client.get(f"{BASE}/{path}")
    assert response.status_code == 404
    assert message in response.json()["detail"]


def test_unknown_index_and_malformed_id(client: TestClient) -> None:
    response = client.get("/v1/indexes/nope/examples/1")
    assert response.status_code == 404 and "served indexes" in response.json()["detail"]
    assert client.get(f"{BASE}/examples/abc").status_code == 422


# ---- PNG --------------------------------------------------------------------------------------------------


def test_training_image_pixels_equal_the_stored_input(client: TestClient, index_root: Path) -> None:
    data = load_index(index_root / "digits")
    response = client.get(f"{BASE}/examples/5/image.png", params={"scale": 1})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.headers[SCALING_HEADER] == "unit"  # the digits lie in [0, 1]
    pixels = decode_png(response.content)
    assert pixels.shape == (28, 28)
    expected = np.rint(np.asarray(data.inputs[5], dtype=np.float64).reshape(28, 28) * 255)
    assert np.array_equal(pixels, expected.astype(np.uint8))


@pytest.mark.parametrize("scale", [None, 1, 3, 16])
def test_query_image_is_upscaled_nearest_neighbour(
    client: TestClient, test_digits: Dataset, scale: int | None
) -> None:
    params = {} if scale is None else {"scale": scale}
    response = client.get(f"{BASE}/queries/2/image.png", params=params)
    assert response.status_code == 200, response.text
    s = DEFAULT_SCALE if scale is None else scale
    pixels = decode_png(response.content)
    assert pixels.shape == (28 * s, 28 * s)
    base = np.rint(test_digits.inputs[2].numpy().astype(np.float64).reshape(28, 28) * 255).astype(np.uint8)
    assert np.array_equal(pixels, np.kron(base, np.ones((s, s), dtype=np.uint8)))


@pytest.mark.parametrize("scale", [0, 17, -2])
def test_bad_scale_is_422(client: TestClient, scale: int) -> None:
    response = client.get(f"{BASE}/examples/1/image.png", params={"scale": scale})
    assert response.status_code == 422 and "scale" in response.text


def test_non_image_index_has_no_rendering(client: TestClient) -> None:
    body = client.get("/v1/indexes/plain/examples/3").json()
    assert body["index"] == "plain" and body["image_shape"] is None and body["image_url"] is None
    for path in ("examples/3/image.png", "queries/3/image.png"):
        response = client.get(f"/v1/indexes/plain/{path}")
        assert response.status_code == 404
        assert "no image_shape" in response.json()["detail"]
    assert len(client.get("/v1/indexes/plain/queries/3", params={"include_input": 1}).json()["input"]) == 784


def test_gray_scaling() -> None:
    unit, how = to_gray8(np.array([[0.0, 0.5], [1.0, 0.25]]))
    assert how == "unit" and unit.tolist() == [[0, 128], [255, 64]]
    spread, how = to_gray8(np.array([[-1.0, 0.0], [3.0, 1.0]]))
    assert how == "minmax" and spread.tolist() == [[0, 64], [255, 128]]
    flat, how = to_gray8(np.full((2, 2), 7.0))
    assert how == "minmax" and flat.tolist() == [[0, 0], [0, 0]]
    with pytest.raises(ValueError, match="cannot be drawn as a 28 x 28 image"):
        render_png(np.zeros(783), (28, 28))
    with pytest.raises(ValueError, match="scale must be at least 1"):
        render_png(np.zeros(4), (2, 2), scale=0)
    png, how = render_png(np.linspace(-2, 2, 6), (2, 3), scale=2)
    assert how == "minmax" and decode_png(png).shape == (4, 6)


# ---- GET forms of the queries -----------------------------------------------------------------------------


@pytest.mark.parametrize(("score", "direction"), [(s, d) for s in Score for d in Direction][::2])
def test_get_attributions_equals_post(client: TestClient, score: Score, direction: Direction) -> None:
    params = {"query_id": 4, "top_k": 7, "score": score.value, "direction": direction.value}
    got = client.get(f"{BASE}/attributions", params=params)
    assert got.status_code == 200, got.text
    posted = client.post(
        f"{BASE}/attributions",
        json={"query": {"id": 4}, "top_k": 7, "score": score.value, "direction": direction.value},
    )
    assert without_timings(got.json()) == without_timings(posted.json())


def test_get_attributions_defaults_equal_post_defaults(client: TestClient) -> None:
    got = client.get(f"{BASE}/attributions", params={"query_id": 9}).json()
    posted = client.post(f"{BASE}/attributions", json={"query": {"id": 9}}).json()
    assert without_timings(got) == without_timings(posted)


@pytest.mark.parametrize("objective", list(Objective))
def test_get_subset_equals_post(client: TestClient, objective: Objective) -> None:
    params = {"query_id": 2, "size": 5, "objective": objective.value, "candidates": 50}
    got = client.get(f"{BASE}/attributions/subset", params=params)
    assert got.status_code == 200, got.text
    body = {"query": {"id": 2}, "size": 5, "objective": objective.value, "candidates": 50}
    posted = client.post(f"{BASE}/attributions/subset", json=body)
    assert without_timings(got.json()) == without_timings(posted.json())


@pytest.mark.parametrize(
    ("path", "params", "code", "message"),
    [
        ("attributions", {}, 422, "query_id"),
        ("attributions", {"query_id": 80}, 404, "valid ids are 0..79"),
        ("attributions", {"query_id": 1, "score": "banana"}, 422, "information_gain"),
        ("attributions", {"query_id": 1, "top_k": 0}, 422, "greater than or equal to 1"),
        ("attributions", {"query_id": 1, "top_k": 5000}, 422, "top_k must be at most"),
        ("attributions/subset", {"query_id": 1, "size": 20, "candidates": 10}, 422, "must be at least size"),
        ("attributions/subset", {"query_id": 1, "objective": "influence"}, 422, "information_loss"),
    ],
)
def test_get_forms_refuse_bad_parameters(
    client: TestClient, path: str, params: dict, code: int, message: str
) -> None:
    response = client.get(f"{BASE}/{path}", params=params)
    assert response.status_code == code, response.text
    assert message in response.text


# ---- the dashboard's files --------------------------------------------------------------------------------


def test_dashboard_page_and_assets(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for element_id in ("index-select", "query-id", "score-select", "direction-select", "results", "chart"):
        assert f'id="{element_id}"' in page.text
    script = client.get("/static/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert client.get("/static/style.css").headers["content-type"].startswith("text/css")
    assert client.get("/static/nope.js").status_code == 404
    assert "/" not in client.get("/openapi.json").json()["paths"]  # the page is not part of the API


def test_dashboard_needs_nothing_from_elsewhere() -> None:
    """Offline: no CDN scripts, stylesheets, fonts or images; only relative URLs to this service."""
    remote = re.compile(
        r"""(src|href)\s*=\s*["']?(https?:)?//|@import|url\(\s*["']?(https?:)?//|fetch\(\s*["']https?:"""
    )
    for name in ("index.html", "app.js", "style.css"):
        text = (STATIC_DIR / name).read_text()
        assert not remote.search(text), f"{name} refers to a remote resource"


def test_new_endpoints_are_documented(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/v1/indexes/{name}/examples/{example_id}",
        "/v1/indexes/{name}/examples/{example_id}/image.png",
        "/v1/indexes/{name}/queries/{example_id}",
        "/v1/indexes/{name}/queries/{example_id}/image.png",
    ):
        assert "get" in paths[path]
    assert {"get", "post"} <= set(paths["/v1/indexes/{name}/attributions"])
    assert {"get", "post"} <= set(paths["/v1/indexes/{name}/attributions/subset"])
