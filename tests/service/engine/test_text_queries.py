"""Language-model indexes in the service (issue #12): the tokenizer stored in the index, text queries with a
given or greedy continuation, token-id inputs and targets, stored queries; built, served by a live uvicorn
process and queried by text and by stored id."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from benchmarks.live_server import running_service
from indexer.build import build_index
from indexer.config import IndexConfig
from indexer.data import Dataset
from indexer.demo.text import train_tokenizer
from indexer.enums import Direction, Score
from indexer.exceptions import IndexCorruptError, InvalidQueryError
from indexer.features.language import IGNORE_INDEX, LanguageModelMargin, causal_lm_targets
from indexer.features.models import build_model
from indexer.store.layout import TOKENIZER_FILE
from indexer.store.reader import load_index
from service.app import create_app
from service.core.settings import Settings
from service.engine import AttributionEngine

VOCAB, LENGTH = 320, 24  # the text_lm fixture's


@pytest.fixture(scope="module")
def lm_root(text_lm) -> Path:  # type: ignore[no-untyped-def]
    assert (text_lm.vocab, text_lm.length) == (VOCAB, LENGTH)
    return Path(text_lm.root)


@pytest.fixture(scope="module")
def texts(text_lm) -> list[str]:  # type: ignore[no-untyped-def]
    return list(text_lm.texts)


@pytest.fixture(scope="module")
def engine(lm_root: Path) -> AttributionEngine:
    return AttributionEngine(load_index(lm_root / "lm"))


def test_the_tokenizer_is_stored_and_verified(lm_root: Path, tmp_path: Path) -> None:
    index = load_index(lm_root / "lm")
    assert index.tokenizer_path == lm_root / "lm" / TOKENIZER_FILE
    assert (
        TOKENIZER_FILE in index.manifest.files
        and load_index(lm_root / "lm-untokenized").tokenizer_path is None
    )
    # an edited tokenizer is a corrupt index, like any other file
    import shutil

    copy = tmp_path / "lm"
    shutil.copytree(lm_root / "lm", copy)
    (copy / TOKENIZER_FILE).write_text((copy / TOKENIZER_FILE).read_text().replace("Return", "Retorn"))
    with pytest.raises(IndexCorruptError, match=r"tokenizer\.json does not match its sha256"):
        load_index(copy)


def test_a_mismatching_or_unreadable_tokenizer_is_refused_naming_the_file(
    lm_root: Path, texts: list[str], tmp_path: Path
) -> None:
    larger = tmp_path / "larger.json"
    big = train_tokenizer(texts, VOCAB + 40)
    big.save(str(larger))  # type: ignore[attr-defined]
    ids = torch.zeros((2, LENGTH), dtype=torch.int64)
    data = Dataset(ids, causal_lm_targets(ids))
    spec = load_index(lm_root / "lm").manifest.model.spec
    assert spec is not None
    args = (build_model(spec), LanguageModelMargin(VOCAB), data, tmp_path / "x")
    assert big.get_vocab_size() == VOCAB + 40  # type: ignore[attr-defined]
    with pytest.raises(
        ValueError, match=rf"tokenizer {larger} has 360 tokens but the model's logits have width 320"
    ):
        build_index(*args, tokenizer=larger, progress=False)
    garbage = tmp_path / "garbage.json"
    garbage.write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match=rf"tokenizer {garbage} is not a tokenizers JSON file"):
        build_index(*args, tokenizer=garbage, progress=False)


def test_a_text_query_equals_its_token_ids(engine: AttributionEngine) -> None:
    """The text and continuation, tokenized and concatenated, scored on the continuation only: the same
    feature as the raw token-id input with those targets."""
    tokenizer = engine.queries.tokenizer
    prompt, continuation = "Return the number", " of items"
    query = engine.queries.text(prompt, continuation)
    p, c = tokenizer.encode(prompt).ids, tokenizer.encode(continuation).ids
    ids = [*p, *c] + [0] * (LENGTH - len(p) - len(c))
    targets = [IGNORE_INDEX] * LENGTH
    for t in range(len(p) - 1, len(p) + len(c) - 1):
        targets[t] = ids[t + 1]
    raw = engine.queries.input(ids, targets)
    np.testing.assert_allclose(query.terms.phi, raw.terms.phi, rtol=1e-6, atol=1e-7)
    assert (query.kind, query.text, query.continuation, query.continuation_source) == (
        "text",
        prompt,
        continuation,
        "given",
    )
    assert query.target == targets and all(type(t) is int for t in query.target)
    assert query.output == pytest.approx(raw.output, rel=1e-6)
    # the predictive entropy sums the next-token entropies at the explained positions only
    with torch.no_grad():
        log_p = torch.log_softmax(engine.queries.model(torch.tensor([ids])).double()[0], dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1).numpy()
    scored = np.array(targets) != IGNORE_INDEX
    assert engine.describe(query).predictive_entropy == pytest.approx(entropy[scored].sum(), rel=1e-5)


def test_without_a_continuation_the_greedy_one_is_explained(engine: AttributionEngine) -> None:
    model, tokenizer = engine.queries.model, engine.queries.tokenizer
    prompt = tokenizer.encode("Sort the list").ids
    tokens = list(prompt)
    for _ in range(3):  # the reference: argmax of the next-token logits, one token at a time
        ids = torch.tensor([tokens + [0] * (LENGTH - len(tokens))])
        with torch.no_grad():
            tokens.append(int(model(ids)[0, len(tokens) - 1].argmax()))
    query = engine.queries.text("Sort the list", max_new_tokens=3)
    assert query.continuation_source == "greedy"
    assert query.continuation == tokenizer.decode(tokens[len(prompt) :])
    assert [t for t in query.target if t != IGNORE_INDEX] == tokens[len(prompt) :]


def test_text_queries_refuse_what_they_cannot_explain(lm_root: Path, engine: AttributionEngine) -> None:
    with pytest.raises(InvalidQueryError, match=r"has no tokenizer \(build it with --tokenizer\)"):
        AttributionEngine(load_index(lm_root / "lm-untokenized")).queries.text("Return")
    with pytest.raises(InvalidQueryError, match=r"text is \d+ tokens; this model reads 24"):
        engine.queries.text("Return the number of items " * 10)
    with pytest.raises(InvalidQueryError, match=r"text and continuation are \d+ \+ \d+ tokens"):
        engine.queries.text("Return", " the number of items in a container" * 5)
    with pytest.raises(InvalidQueryError, match=r"target must be 24 token ids"):
        engine.queries.input([1] * LENGTH, 3)
    with pytest.raises(InvalidQueryError, match=r"target token ids must be -100 or in 0..319; got 320"):
        engine.queries.input([1] * LENGTH, [320] * LENGTH)
    with pytest.raises(InvalidQueryError, match=r"scores no position"):
        engine.queries.input([1] * LENGTH, [IGNORE_INDEX] * LENGTH)


def test_stored_and_text_queries_over_http(lm_root: Path, texts: list[str]) -> None:
    """Stored queries answer token-id labels and predictions (lists of ints); results carry the passage."""
    with TestClient(create_app(Settings(index_root=lm_root))) as client:
        stored = client.post("/v1/indexes/lm/attributions", json={"query": {"id": 2}, "top_k": 3})
        assert stored.status_code == 200, stored.text
        info = stored.json()["query"]
        assert len(info["label"]) == LENGTH and all(type(t) is int for t in info["label"])
        assert info["metadata"]["text"] == texts[2]
        assert stored.json()["results"][0]["metadata"]["text"] in texts
        example = client.get("/v1/indexes/lm/examples/3", params={"include_input": "true"})
        assert example.status_code == 200, example.text
        assert example.json()["metadata"]["text"] == texts[3] and len(example.json()["prediction"]) == LENGTH
        assert all(type(t) is int for t in example.json()["input"])  # token ids stay integers
        subset = client.post(
            "/v1/indexes/lm/attributions/subset", json={"query": {"text": "Sort"}, "size": 2}
        )
        assert subset.status_code == 200, subset.text
        assert all(m["metadata"]["text"] in texts for m in subset.json()["members"])
        coreset = client.post("/v1/indexes/lm/coreset", json={"size": 2})
        assert coreset.status_code == 200 and len(coreset.json()["members"][0]["label"]) == LENGTH
        refused = client.post("/v1/indexes/lm-untokenized/attributions", json={"query": {"text": "Return"}})
        assert refused.status_code == 422 and "has no tokenizer" in refused.json()["detail"]
        mixed = client.post("/v1/indexes/lm/attributions", json={"query": {"id": 1, "continuation": "x"}})
        assert mixed.status_code == 422 and "'continuation' applies only to a 'text' query" in mixed.text


@pytest.mark.slow
def test_a_live_server_answers_text_like_the_library(
    lm_root: Path, engine: AttributionEngine, tmp_path_factory: pytest.TempPathFactory
) -> None:
    log = tmp_path_factory.mktemp("lm-live") / "server.log"
    with running_service(lm_root, log) as service, httpx.Client(base_url=service.url, timeout=60) as client:
        body = {"query": {"text": "Open the file", "continuation": " and return"}, "top_k": 5}
        got = client.post("/v1/indexes/lm/attributions", json=body)
        assert got.status_code == 200, got.text
        query = engine.queries.text("Open the file", " and return")
        want = engine.rank(query, Score.INFORMATION_GAIN, Direction.BOTH, 5, 100)
        assert [r["id"] for r in got.json()["results"]] == want.ids.tolist()
        info = got.json()["query"]
        assert (info["kind"], info["continuation"], info["continuation_source"]) == (
            "text",
            " and return",
            "given",
        )
        assert info["target"] == query.target
        greedy = client.post("/v1/indexes/lm/attributions", json={"query": {"text": "Open the file"}})
        assert greedy.json()["query"]["continuation_source"] == "greedy"
        by_id = client.get("/v1/indexes/lm/attributions", params={"query_id": 0, "top_k": 2})
        assert by_id.status_code == 200 and len(by_id.json()["query"]["prediction"]) == LENGTH


def test_review_findings_on_text_indexes(lm_root: Path) -> None:
    """A newcomer review: a million-element target took 15 s of pydantic errors on the event loop (and
    answered a wall of union errors); '<pad>' written out was explained as padding; a negative token id
    got the embedding's IndexError."""
    with TestClient(create_app(Settings(index_root=lm_root))) as client:
        url = "/v1/indexes/lm/attributions"
        huge = client.post(url, json={"query": {"input": [5] * LENGTH, "target": [True] * 1_000_000}})
        (error,) = huge.json()["detail"]  # one error from one pass (pydantic made one per element and branch)
        assert (
            error["msg"] == "expected a number, or a list of integer token ids; position 0 holds true/false"
        )
        (floats,) = client.post(
            url, json={"query": {"input": [5] * LENGTH, "target": [1.0] * LENGTH}}
        ).json()["detail"]
        assert floats["loc"] == ["body", "query", "target"] and "position 0 holds float" in floats["msg"]
        for body, expected in (
            ({"text": "Return", "continuation": "<pad>"}, "continuation holds the padding token (id 0"),
            ({"text": "<pad> Return"}, "text holds the padding token (id 0"),
            ({"input": [-1] * LENGTH}, f"input token ids must be in 0..{VOCAB - 1}; got -1"),
        ):
            response = client.post(url, json={"query": body})
            assert response.status_code == 422 and expected in response.json()["detail"], response.text


def test_an_index_without_passage_metadata_decodes_its_token_ids(text_lm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A CLI-built LM index (a data file has no metadata) answered `metadata: {}`: the passages are now
    decoded from the stored token ids with the index's tokenizer."""
    source = load_index(Path(text_lm.root) / "lm")
    assert source.inputs is not None and source.manifest.model.spec is not None
    ids = torch.from_numpy(np.array(source.inputs[:6]))
    data = Dataset(ids, torch.from_numpy(np.array(source.examples["label"][:6])))  # no metadata
    build_index(
        build_model(source.manifest.model.spec), LanguageModelMargin(VOCAB), data, tmp_path / "bare",
        queries=data, model_spec=source.manifest.model.spec, config=IndexConfig(k=16, min_coverage=0.0),
        tokenizer=source.tokenizer_path, progress=False,
    )  # fmt: skip
    engine = AttributionEngine(load_index(tmp_path / "bare"))

    def read(i: int) -> str:  # the passage as the model reads it: its first 24 tokens
        text = engine.example("train", i).metadata["text"]
        assert set(engine.example("train", i).metadata) == {"text"} and len(text) > 20
        assert text_lm.texts[i].startswith(text)
        return str(text)

    passages = [read(i) for i in range(6)]
    assert passages[2] == "Convert a string to lower case and strip the"
    ranked = engine.attribute(engine.queries.stored(1), Score.INFLUENCE, Direction.BOTH, 3, 6)
    assert all(example.metadata["text"] == passages[example.id] for example in ranked.examples)
    assert engine.describe(engine.queries.stored(1)).metadata == {"text": passages[1]}
