"""The audit dashboard in a real browser: Debian's chromium driven by Playwright, against a live service.

The page must show, for the same query, exactly the training examples that the JSON API returns. Nothing is
downloaded: Playwright's own browsers are never installed; ``make test`` installs Debian's chromium.

Environment (optional):
    INFOTRACE_CHROMIUM: the browser binary (default ``/usr/bin/chromium``).
    INFOTRACE_DASHBOARD_INDEX_ROOT: serve this folder of indexes (it must hold ``digits``) instead of the
        small test index; ``make dashboard-screenshot`` points it at the demo index.
    INFOTRACE_DASHBOARD_SCREENSHOT: where to save the screenshot (default: the test's temporary folder).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from benchmarks.live_server import running_service

pytestmark = pytest.mark.slow

sync_api = pytest.importorskip("playwright.sync_api", reason="the test extra installs playwright")

CHROMIUM = Path(os.environ.get("INFOTRACE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
INDEX = "digits"
QUERY_ID = 3
TIMEOUT_MS = 30_000

if not CHROMIUM.is_file():
    pytest.skip(f"{CHROMIUM} is missing (make test installs Debian's chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def served_root(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    override = os.environ.get("INFOTRACE_DASHBOARD_INDEX_ROOT")
    if override:
        return Path(override).resolve()
    # the small session indexes (built only when they are the ones served): the digits and a text LM
    root = tmp_path_factory.mktemp("dashboard-indexes")
    shutil.copytree(Path(request.getfixturevalue("index_root")) / INDEX, root / INDEX)
    shutil.copytree(Path(request.getfixturevalue("text_lm").root) / "lm", root / "lm")
    return root


@pytest.fixture(scope="module")
def live_url(served_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The service in its own uvicorn process on a free loopback port, as in production."""
    with running_service(served_root, tmp_path_factory.mktemp("dashboard") / "server.log") as service:
        yield service.url


@pytest.fixture(scope="module")
def api(live_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{live_url}/v1/indexes/{INDEX}", timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def page(live_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One chromium page with a fresh profile; page errors fail the test that caused them."""
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_api.sync_playwright() as playwright:
        # a persistent context is how Playwright takes --user-data-dir (a fresh, empty profile here)
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            args=CHROMIUM_FLAGS,
            headless=True,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            tab = context.new_page()
            tab.set_default_timeout(TIMEOUT_MS)
            errors: list[str] = []
            tab.on("pageerror", lambda exc: errors.append(str(exc)))
            tab.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            tab.errors = errors  # type: ignore[attr-defined]
            tab.goto(f"{live_url}/")
            yield tab
        finally:
            context.close()


def wait_ready(page: Any, **described: str) -> None:
    """Wait until #results shows a finished view with these data-* attributes (e.g. score="influence")."""
    selector = '#results[data-state="ready"]' + "".join(f'[data-{k}="{v}"]' for k, v in described.items())
    page.wait_for_selector(selector, state="attached")


def rendered_ids(page: Any) -> list[int]:
    return [
        int(i) for i in page.eval_on_selector_all("#results [data-id]", "rows => rows.map(r => r.dataset.id)")
    ]


def api_top_ids(api: httpx.Client, query: dict[str, Any], **options: Any) -> list[int]:
    response = api.post("/attributions", json={"query": query, **options})
    assert response.status_code == 200, response.text
    return [r["id"] for r in response.json()["results"]]


def assert_no_page_errors(page: Any) -> None:
    assert page.errors == [], page.errors


def test_dashboard_loads_and_lists_the_index(page: Any) -> None:
    wait_ready(page, mode="ranking")  # the first view (stored query 0) comes up on its own
    assert page.eval_on_selector("#index-select", "s => s.value") == INDEX
    assert "training examples" in page.inner_text("#index-summary")
    assert_no_page_errors(page)


def test_stored_query_top_10_equals_the_api(page: Any, api: httpx.Client) -> None:
    page.fill("#query-id", str(QUERY_ID))
    page.click("#run-button")
    wait_ready(page, mode="ranking", query=str(QUERY_ID), score="information_gain", direction="both")
    expected = api_top_ids(api, {"id": QUERY_ID}, top_k=10)
    assert len(expected) == 10
    assert rendered_ids(page) == expected

    # the query panel: prediction, posterior variance and predictive entropy, as the API says
    query = api.post("/attributions", json={"query": {"id": QUERY_ID}}).json()["query"]
    table = page.inner_text("#query-table")
    assert "posterior variance" in table and "predictive entropy" in table
    assert page.inner_text('#query-table tr[data-key="prediction"] td') == str(query["prediction"])
    # every result row shows its picture (rendered by the examples endpoint) and a bar in the chart
    widths = page.eval_on_selector_all("#results [data-id] img", "imgs => imgs.map(i => i.naturalWidth)")
    assert len(widths) == 10 and all(w > 0 for w in widths)
    assert page.eval_on_selector("#query-image", "i => i.naturalWidth") > 0
    assert page.eval_on_selector_all("#bar-chart rect[data-id]", "bars => bars.length") == 10
    # the raw-JSON link answers the same ranking
    link = page.get_attribute("#raw-json-link", "href")
    assert link is not None and f"query_id={QUERY_ID}" in link
    linked = httpx.get(page.url.split("#")[0] + link, timeout=60).json()
    assert [r["id"] for r in linked["results"]] == expected
    assert_no_page_errors(page)


@pytest.mark.parametrize(
    ("score", "direction"),
    [("influence", "both"), ("information_loss", "opponents"), ("cosine", "proponents")],
)
def test_switching_score_and_direction(page: Any, api: httpx.Client, score: str, direction: str) -> None:
    page.select_option("#score-select", score)
    page.select_option("#direction-select", direction)
    wait_ready(page, mode="ranking", query=str(QUERY_ID), score=score, direction=direction)
    expected = api_top_ids(api, {"id": QUERY_ID}, top_k=10, score=score, direction=direction)
    assert rendered_ids(page) == expected
    signs = page.eval_on_selector_all("#results [data-id]", "rows => rows.map(r => Number(r.dataset.sign))")
    if direction == "proponents":
        assert all(s > 0 for s in signs)
    if direction == "opponents":
        assert all(s < 0 for s in signs)
    assert_no_page_errors(page)


def test_subset_mode_shows_the_greedy_set(page: Any, api: httpx.Client) -> None:
    page.click("#mode-subset")
    wait_ready(page, mode="subset", query=str(QUERY_ID), objective="information_loss", size="10")
    body = {"query": {"id": QUERY_ID}, "size": 10, "objective": "information_loss", "candidates": 200}
    subset = api.post("/attributions/subset", json=body).json()
    assert rendered_ids(page) == [m["id"] for m in subset["members"]]
    summary = page.inner_text("#subset-summary")
    assert "joint" in summary and "top-10 single-example set" in summary
    page.select_option("#objective-select", "information_gain")
    wait_ready(page, mode="subset", query=str(QUERY_ID), objective="information_gain")
    subset = api.post("/attributions/subset", json={**body, "objective": "information_gain"}).json()
    assert rendered_ids(page) == [m["id"] for m in subset["members"]]
    page.click("#mode-ranking")
    wait_ready(page, mode="ranking", query=str(QUERY_ID))
    assert_no_page_errors(page)


def test_pasted_input_equals_the_stored_query(page: Any, api: httpx.Client) -> None:
    page.select_option("#score-select", "information_gain")
    page.select_option("#direction-select", "both")
    wait_ready(page, mode="ranking", query=str(QUERY_ID), score="information_gain", direction="both")
    page.click("#source-input")
    page.click("#copy-stored-input")  # the stored query's raw input and label, into the text box
    page.wait_for_function("document.getElementById('raw-input').value.length > 100")
    page.click("#run-button")
    wait_ready(page, mode="ranking", query="input", score="information_gain")
    assert rendered_ids(page) == api_top_ids(api, {"id": QUERY_ID}, top_k=10)
    page.fill("#raw-input", "[1, 2, 3]")
    page.click("#run-button")
    page.wait_for_selector('#status[data-state="error"]')
    assert "shape" in page.inner_text("#status")  # the API's 422 detail, shown to the user
    page.errors.clear()  # the browser logs that (intended) 422 on its console
    page.click("#source-stored")
    wait_ready(page, mode="ranking", query=str(QUERY_ID))


def test_uploaded_files_become_the_input(page: Any, api: httpx.Client) -> None:
    """A .json array is taken as is; an image (here the stored query's own PNG) is read as gray levels."""
    stored = api.get(f"/queries/{QUERY_ID}", params={"include_input": True}).json()
    png = api.get(f"/queries/{QUERY_ID}/image.png", params={"scale": 1}).content
    page.click("#source-input")
    page.fill("#raw-target", "")
    uploads = [
        ("digit.json", "application/json", json.dumps(stored["input"]).encode()),
        ("digit.png", "image/png", png),
    ]
    for name, mime, content in uploads:
        page.fill("#raw-input", "")
        page.set_input_files("#raw-file", files=[{"name": name, "mimeType": mime, "buffer": content}])
        page.wait_for_function("document.getElementById('raw-input').value.length > 100")
        values = json.loads(page.input_value("#raw-input"))
        assert np.allclose(values, stored["input"], atol=1e-3)  # the PNG's levels, rounded to 3 decimals
        page.click("#run-button")
        wait_ready(page, mode="ranking", query="input")
        assert rendered_ids(page) == api_top_ids(api, {"input": values}, top_k=10)
    page.click("#source-stored")
    wait_ready(page, mode="ranking", query=str(QUERY_ID))
    assert_no_page_errors(page)


def test_clicking_a_result_shows_the_training_example(page: Any, api: httpx.Client) -> None:
    first = rendered_ids(page)[0]
    page.click(f'#results [data-id="{first}"] td.id')
    page.wait_for_selector("#example-detail img.digit")
    detail = page.inner_text("#example-detail")
    example = api.get(f"/examples/{first}").json()
    assert f"Training example {first}" in detail and "source_row" in detail
    assert str(example["label"]) in detail
    assert_no_page_errors(page)


def test_screenshot(page: Any, tmp_path: Path) -> None:
    """The view the README shows: stored test example 3, top 10 by information gain."""
    page.select_option("#score-select", "information_gain")
    wait_ready(page, mode="ranking", query=str(QUERY_ID), score="information_gain", direction="both")
    page.wait_for_load_state("networkidle")
    page.wait_for_function(
        "[...document.querySelectorAll('#results img, #query-image')]"
        ".every(i => i.complete && i.naturalWidth > 0)"
    )
    target = Path(os.environ.get("INFOTRACE_DASHBOARD_SCREENSHOT") or tmp_path / "dashboard.png")
    target.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(target), full_page=True)
    assert target.stat().st_size > 10_000
    assert_no_page_errors(page)


def test_a_text_index_takes_sentences_and_shows_passages(page: Any, live_url: str) -> None:
    """Issue #12: a language-model index is queried by text; the query shows the text and its
    continuation, each result its training passage; the ranking is the API's."""
    listed = httpx.get(f"{live_url}/v1/indexes", timeout=60).json()["indexes"]
    text_index = next(ix["name"] for ix in listed if ix.get("text_queries"))
    assert not next(ix for ix in listed if ix["name"] == INDEX)["text_queries"]
    page.select_option("#index-select", text_index)
    wait_ready(page, mode="ranking", query="0", index=text_index)
    assert page.is_visible("#source-text")
    page.click("#source-text")
    page.fill("#query-text", "Open the file")
    page.fill("#query-continuation", " and return")
    page.select_option("#score-select", "information_loss")
    page.click("#run-button")
    wait_ready(page, mode="ranking", query="text", score="information_loss", index=text_index)
    body = {"query": {"text": "Open the file", "continuation": " and return", "max_new_tokens": 16},
            "top_k": 10, "score": "information_loss", "direction": "both"}  # fmt: skip
    response = httpx.post(f"{live_url}/v1/indexes/{text_index}/attributions", json=body, timeout=60).json()
    assert rendered_ids(page) == [r["id"] for r in response["results"]]
    passages = page.eval_on_selector_all("#results [data-id] .example-text", "s => s.map(e => e.title)")
    assert passages == [r["metadata"]["text"] for r in response["results"]]
    assert page.inner_text("#query-passage") == "Open the file and return"
    assert page.inner_text("#query-passage mark") == " and return"
    label = page.inner_text('#query-table tr[data-key="explained target"] td')
    assert label == f"{sum(t != -100 for t in response['query']['target'])} tokens"
    # the view is in the URL: a reload brings the text query back
    assert "source=text" in page.url
    page.reload()
    wait_ready(page, mode="ranking", query="text", score="information_loss", index=text_index)
    assert page.input_value("#query-continuation") == " and return"
    assert rendered_ids(page) == [r["id"] for r in response["results"]]
    # a stored query's token ids and token targets, copied into the raw-input form: the same query
    page.click("#source-stored")
    wait_ready(page, mode="ranking", query="0", index=text_index)
    stored_output = page.inner_text('#query-table tr[data-key="output (margin)"] td')
    page.click("#source-input")
    page.click("#copy-stored-input")
    page.wait_for_function("document.getElementById('raw-target').value.startsWith('[')")
    page.click("#run-button")
    wait_ready(page, mode="ranking", query="input", index=text_index)
    assert page.inner_text('#query-table tr[data-key="output (margin)"] td') == stored_output
    page.click("#source-text")
    page.fill("#query-continuation", "")  # the model's own greedy continuation
    page.click("#run-button")
    page.wait_for_function("document.getElementById('query-table').innerText.includes('greedy')")
    page.select_option("#index-select", INDEX)
    wait_ready(page, mode="ranking", query="0", index=INDEX)
    assert page.is_hidden("#source-text")
    assert_no_page_errors(page)
