"""Run the service as a real uvicorn process on a free loopback port: for end-to-end tests and benchmarks.

This is the production entry point (``infotrace-serve run``) in a subprocess, not an in-process app, so
that what is measured or tested is what a user runs. Only tests and benchmarks use it; nothing in
``service/`` imports it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

__all__ = ["RunningService", "free_loopback_port", "running_service"]


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it back, close)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class RunningService:
    """A service process that answered ``GET /readyz`` with 200.

    Attributes:
        url: ``http://127.0.0.1:<port>``.
        port: the port.
        process: the ``infotrace-serve run`` process.
        log_path: where its stdout and stderr go.
        ready_seconds: seconds from start until ready.
    """

    url: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    ready_seconds: float

    def log_tail(self, chars: int = 3000) -> str:
        """The last ``chars`` characters of the service's log."""
        return _tail(self.log_path, chars)


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return ""


@contextlib.contextmanager
def running_service(
    index_root: Path,
    log_path: Path,
    env: dict[str, str] | None = None,
    log_level: str = "warning",
    ready_timeout_s: float = 60.0,
) -> Iterator[RunningService]:
    """Start ``infotrace-serve run`` for ``index_root`` on a free loopback port; stop it on exit.

    The environment is this process's minus every ``INFOTRACE_*`` variable, plus ``env``, plus the index
    root, host 127.0.0.1 and the port. On exit the process is terminated (SIGTERM: graceful), then killed
    if it lingers, whatever the caller did to it.

    Args:
        index_root: folder of index folders.
        log_path: file for the server's output.
        env: extra ``INFOTRACE_*`` settings.
        log_level: the server's log level.
        ready_timeout_s: how long to wait for ``/readyz`` to answer 200, in seconds.

    Yields:
        :class:`RunningService`.

    Raises:
        RuntimeError: the server exited before it was ready (the message has its log).
        TimeoutError: not ready within ``ready_timeout_s``.
    """
    port = free_loopback_port()
    server_env = {key: value for key, value in os.environ.items() if not key.startswith("INFOTRACE_")}
    server_env |= (env or {}) | {
        "INFOTRACE_INDEX_ROOT": str(Path(index_root).resolve()),
        "INFOTRACE_HOST": "127.0.0.1",
        "INFOTRACE_PORT": str(port),
    }
    cli = Path(sys.executable).with_name("infotrace-serve")
    started = time.perf_counter()
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [str(cli), "run", "--log-level", log_level],
            env=server_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        last = "no answer yet"
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"the server exited ({process.returncode}) before it was ready:\n{_tail(log_path)}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{url}/readyz was not 200 within {ready_timeout_s} s ({last}):\n{_tail(log_path)}"
                )
            try:
                response = httpx.get(f"{url}/readyz", timeout=2)
                if response.status_code == 200:
                    break
                last = f"HTTP {response.status_code}: {response.text[:300]}"
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.1)
        yield RunningService(url, port, process, Path(log_path), time.perf_counter() - started)
    finally:
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)
