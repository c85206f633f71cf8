"""The Docker images and ``docker-compose.yml``, for real.

Builds the CPU image, brings the compose stack up (the ``indexer`` job builds the demo index into a named
volume, then the ``service`` starts), waits for health, asks for an attribution over HTTP from the host and
checks it against the same query answered in-process from a copy of the index taken out of the volume.
The GPU image is built and run only where ``nvidia-smi`` works.

Runs only with ``INFOTRACE_DOCKER_TESTS=1`` (``make test-docker``), as root on a Debian machine:
``$DOCKER_ENGINE`` (default ``../shared/tools/docker-engine.sh``) installs and starts a Docker engine, and
stops it afterwards if it was not running before. Everything the test creates (containers, network, volume)
lives in a compose project of its own and is removed at the end, pass or fail.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from indexer.enums import Direction, Score
from indexer.store.reader import load_index
from service.engine import AttributionEngine

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("INFOTRACE_DOCKER_TESTS") != "1",
        reason="Docker tests run with INFOTRACE_DOCKER_TESTS=1 (make test-docker)",
    ),
]

REPO = Path(__file__).resolve().parents[2]
CPU_IMAGE = os.environ.get("INFOTRACE_CPU_IMAGE", "infotrace:cpu")
GPU_IMAGE = os.environ.get("INFOTRACE_GPU_IMAGE", "infotrace:gpu")
BUILD_TIMEOUT_S = 30 * 60
STACK_TIMEOUT_S = 15 * 60  # the indexer job (train + index the demo) and the service becoming healthy
BODY = {"query": {"id": 0}, "top_k": 10}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def gpu_present() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi"], capture_output=True, check=False).returncode == 0


class Docker:
    """Runs ``docker`` and ``docker compose`` with the engine's client configuration."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def run(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["docker", *args],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            output = (proc.stdout + proc.stderr)[-6000:]
            raise AssertionError(f"docker {' '.join(args)} exited {proc.returncode}:\n{output}")
        return proc

    def inspect(self, container: str) -> dict:
        return json.loads(self.run("inspect", container).stdout)[0]


@pytest.fixture(scope="module")
def docker() -> Iterator[Docker]:
    engine = os.environ.get("DOCKER_ENGINE", str(REPO.parent / "shared" / "tools" / "docker-engine.sh"))
    env = dict(os.environ)
    was_running = (
        shutil.which("docker") is not None
        and subprocess.run(["docker", "info"], capture_output=True, check=False).returncode == 0
    )
    started = subprocess.run(
        ["bash", engine, "start"], capture_output=True, text=True, timeout=20 * 60, check=False
    )
    if started.returncode != 0:
        raise AssertionError(f"{engine} start failed:\n{(started.stdout + started.stderr)[-6000:]}")
    last = started.stdout.strip().splitlines()[-1] if started.stdout.strip() else ""
    if last.startswith("export DOCKER_CONFIG="):
        env["DOCKER_CONFIG"] = last.removeprefix("export DOCKER_CONFIG=").strip("'\"")
    client = Docker(env)
    try:
        client.run("compose", "version")
        yield client
    finally:
        if not was_running:
            subprocess.run(["bash", engine, "stop"], capture_output=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def cpu_image(docker: Docker) -> str:
    docker.run("build", "--file", "docker/Dockerfile", "--tag", CPU_IMAGE, ".", timeout=BUILD_TIMEOUT_S)
    return CPU_IMAGE


def test_cpu_image_is_unprivileged_and_lean(docker: Docker, cpu_image: str) -> None:
    config = docker.inspect(cpu_image)["Config"]
    assert config["User"] == "10001:10001"
    assert "/indexes" in config["Volumes"]
    assert "8000/tcp" in config["ExposedPorts"]
    assert config["Cmd"] == ["infotrace-serve", "run"]
    assert any("/healthz" in part for part in config["Healthcheck"]["Test"])
    probe = (
        "import importlib.util as u, os, shutil; "
        "assert u.find_spec('pip') is None, 'pip in the runtime venv'; "
        "assert not os.path.exists('/wheels'), 'local wheels in the final stage'; "
        "assert not any(shutil.which(t) for t in ('gcc', 'cc', 'g++', 'make')), 'build tools'; "
        "import torch, faiss, indexer, service; "
        "print(os.getuid(), torch.__version__)"
    )
    out = docker.run("run", "--rm", cpu_image, "python", "-c", probe).stdout.split()
    assert out[0] == "10001"
    assert out[1].startswith("2.13.0")


def _wait_healthy(docker: Docker, container: str, deadline: float) -> None:
    while True:
        info = docker.inspect(container)
        state = info["State"]
        health = state.get("Health", {}).get("Status")
        if health == "healthy":
            return
        crashed = state["Status"] not in ("created", "running") or info["RestartCount"] > 0
        assert not crashed, f"service container crashed: {state}"
        assert time.monotonic() < deadline, f"service not healthy within {STACK_TIMEOUT_S} s: {health}"
        time.sleep(2)


def test_compose_stack_answers_like_the_library(docker: Docker, cpu_image: str, tmp_path: Path) -> None:
    project = f"infotrace-test-{os.getpid()}"
    port = free_port()
    docker.env = {**docker.env, "INFOTRACE_PORT": str(port)}
    compose = ("compose", "--project-name", project, "--file", "docker-compose.yml")
    deadline = time.monotonic() + STACK_TIMEOUT_S
    try:
        # waits for the indexer job to finish (service_completed_successfully) before starting the service
        docker.run(*compose, "up", "--detach", timeout=STACK_TIMEOUT_S)
        indexer = docker.run(*compose, "ps", "--quiet", "indexer").stdout.strip()
        assert docker.inspect(indexer)["State"]["ExitCode"] == 0
        service = docker.run(*compose, "ps", "--quiet", "service").stdout.strip()
        _wait_healthy(docker, service, deadline)
        bindings = docker.inspect(service)["NetworkSettings"]["Ports"]["8000/tcp"]
        assert {b["HostIp"] for b in bindings} == {"127.0.0.1"}

        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=60) as client:
            assert client.get("/healthz").json()["status"] == "ok"
            assert client.get("/readyz").status_code == 200
            response = client.post("/v1/indexes/digits/attributions", json=BODY)
        assert response.status_code == 200, response.text
        got = response.json()

        docker.run("cp", f"{service}:/indexes/digits", str(tmp_path / "digits"), timeout=600)
    except Exception as exc:
        logs = docker.run(*compose, "logs", "--no-color", "--tail", "80", check=False)
        raise AssertionError(f"{exc}\ncompose logs:\n{(logs.stdout + logs.stderr)[-8000:]}") from exc
    finally:
        docker.run(*compose, "down", "--volumes", "--remove-orphans", "--timeout", "10", check=False)

    engine = AttributionEngine(load_index(tmp_path / "digits"))
    ranked = engine.rank(engine.queries.stored(0), Score.INFORMATION_GAIN, Direction.BOTH, 10, 100)
    results = got["results"]
    assert got["index"] == "digits" and got["score"] == "information_gain"
    assert [r["id"] for r in results] == ranked.ids.tolist()
    np.testing.assert_allclose([r["signed_score"] for r in results], ranked.signed, rtol=1e-9)
    for score in Score:
        np.testing.assert_allclose(
            [r["scores"][score.value] for r in results], ranked.scores[score], rtol=1e-9, err_msg=score.value
        )


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_present(), reason="no GPU (nvidia-smi): docker/Dockerfile.gpu is only linted")
def test_gpu_image_builds_and_sees_the_gpu(docker: Docker) -> None:
    docker.run("build", "--file", "docker/Dockerfile.gpu", "--tag", GPU_IMAGE, ".", timeout=BUILD_TIMEOUT_S)
    probe = "import torch, faiss; assert torch.cuda.is_available(); print(faiss.get_num_gpus())"
    out = docker.run("run", "--rm", "--gpus", "all", GPU_IMAGE, "python", "-c", probe, timeout=600).stdout
    assert int(out.split()[-1]) >= 1
