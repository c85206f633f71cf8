"""The locust users of the load benchmark (:mod:`benchmarks.load` runs ``locust -f`` on this file headless,
in a subprocess of its own, so that gevent's monkey-patching never reaches the driver or pytest).

The plan comes from the JSON file named by ``INFOTRACE_LOAD_PLAN`` (written by the driver): the service's
loopback URL, the index under load, the JSON-encoded raw inputs, the mix, the seed, the request bound and
where to write the samples. Each user (a ``FastHttpUser``: one keep-alive connection) sends requests back
to back, each drawn by :class:`~benchmarks.load_requests.RequestMaker` and checked with
:func:`~benchmarks.load_requests.incomplete`, named by its kind so that locust's own statistics are per
kind. At most ``max_requests`` are issued: the user that finds the bound reached stops, and the last
request to finish stops the run. Every request's kind, status, client-side latency (ms, from sending it to
having its whole body) and error is written to the plan's ``out`` file when locust quits; the driver
computes the statistics.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import gevent
from locust import FastHttpUser, HttpUser, constant, events, task
from locust.exception import StopUser

from benchmarks.load_requests import (
    BATCH_KIND,
    PLAN_ENV,
    RequestMaker,
    Target,
    batch_item_statuses,
    incomplete,
    is_loopback_url,
)

PLAN: dict[str, Any] = json.loads(Path(os.environ[PLAN_ENV]).read_text())
if not is_loopback_url(PLAN["url"]):
    raise SystemExit(f"refusing to load {PLAN['url']!r}: only loopback addresses are allowed")

MAKER = RequestMaker(
    Target(**PLAN["target"]),
    PLAN["encoded_inputs"],
    PLAN["mix"],
    PLAN["scores"],
    PLAN["directions"],
    PLAN["objectives"],
)
SAMPLES: list[dict[str, Any]] = []
_USERS = itertools.count()
_state: dict[str, Any] = {"issued": 0, "in_flight": 0, "started": None, "ended": None, "stopped_by": None}


@events.test_start.add_listener
def _started(**_: Any) -> None:
    _state["started"] = time.time()


@events.quitting.add_listener
def _write(environment: Any, **_: Any) -> None:
    stopped_by = _state["stopped_by"] or "duration"
    summary = {k: _state[k] for k in ("issued", "started", "ended")} | {"stopped_by": stopped_by}
    Path(PLAN["out"]).write_text(json.dumps({**summary, "samples": SAMPLES}))


def _one_request(user: Any, **timeout: float) -> None:
    """Issue, time and check one request of the plan from ``user`` (its ``client`` and ``rng``)."""
    if _state["issued"] >= PLAN["max_requests"]:
        _state["stopped_by"] = _state["stopped_by"] or "max_requests"
        raise StopUser()
    _state["issued"] += 1  # one gevent loop: no lock needed
    _state["in_flight"] += 1
    if PLAN["mode"] == "batch":
        planned = MAKER.batch(user.rng, PLAN["batch_size"])
    else:
        planned = MAKER.draw(user.rng)
    headers = {"content-type": "application/json"} if planned.body is not None else {}
    if PLAN["mode"] == "batch":
        # a connection per batch: whichever worker is free accepts it (a long-lived connection stays with
        # the worker that accepted it, and 4 of them can all land on one worker: half the throughput)
        headers["connection"] = "close"
    sample: dict[str, Any] = {"kind": planned.kind, "user": user.user}
    started = time.perf_counter()
    try:
        with user.client.request(
            planned.method,
            planned.path,
            data=planned.body,
            headers=headers,
            name=planned.kind,
            catch_response=True,
            **timeout,
        ) as response:
            sample["latency_ms"] = (time.perf_counter() - started) * 1e3
            status = response.status_code or None  # 0: no answer (connection error)
            sample["status"] = status
            error = None
            if status != 200:
                error = f"HTTP {status}: {(response.text or str(response.error))[:300]}"
            else:
                try:
                    payload = response.json()
                    error = incomplete(planned, payload)
                    if error is None and planned.kind == BATCH_KIND:
                        sample["items"], sample["item_error"] = batch_item_statuses(payload)
                except ValueError as exc:
                    error = f"invalid JSON body: {exc}"
            sample["error"] = error
            if error is None:
                response.success()
            else:
                response.failure(error)
    finally:
        SAMPLES.append(sample)
        _state["in_flight"] -= 1
        _state["ended"] = time.time()
        if _state["issued"] >= PLAN["max_requests"] and _state["in_flight"] == 0:
            _state["stopped_by"] = "max_requests"
            gevent.spawn(user.environment.runner.quit)  # not from inside this user's own greenlet


class ServiceUser(FastHttpUser):
    """One client of the mixed load: one keep-alive connection (geventhttpclient), requests back to back."""

    host = PLAN["url"]
    wait_time = constant(0)
    network_timeout = PLAN["timeout_s"]
    connection_timeout = PLAN["timeout_s"]

    def on_start(self) -> None:
        self.user = next(_USERS)
        self.rng = random.Random(PLAN["seed"] * 1_000_003 + self.user)

    @task
    def one_request(self) -> None:
        _one_request(self)


class BatchUser(HttpUser):
    """One client of the batch phase (requests' session: geventhttpclient read the 700 KB answers of a
    100-item batch at half the rate, measured), batches back to back."""

    host = PLAN["url"]
    wait_time = constant(0)

    def on_start(self) -> None:
        self.user = next(_USERS)
        self.rng = random.Random(PLAN["seed"] * 1_000_003 + self.user)

    @task
    def one_request(self) -> None:
        _one_request(self, timeout=PLAN["timeout_s"])
