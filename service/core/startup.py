"""What ``infotrace-serve run`` decides before anything imports ``prometheus_client``: how many worker
processes, and Prometheus's multiprocess folder (see :mod:`service.core.workers`). Imports nothing heavy."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

__all__ = ["ANNOUNCED_FILE", "MULTIPROC_ENV", "available_cpus", "prepare_metrics_dir"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""prometheus_client's environment variable naming its multiprocess folder."""

ANNOUNCED_FILE = ".announced"
"""Created (exclusively) in the metrics folder by the first worker that is ready, which prints the URLs."""


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, lowered by a cgroup v2 CPU quota (a container's
    ``--cpus``) when one is set. At least 1."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        count = os.cpu_count() or 1
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            count = min(count, max(1, int(int(quota) / int(period))))
    return max(1, count)


def prepare_metrics_dir() -> tuple[Path, bool]:
    """Choose the Prometheus multiprocess folder and empty it of a previous run's files.

    Must run before ``prometheus_client`` is imported (it picks its value store at import).

    Returns:
        ``(folder, created)``: ``PROMETHEUS_MULTIPROC_DIR`` when the operator set it (created if missing),
        else a new temporary folder, now set in the environment; ``created`` says whether it is ours to
        remove at exit.

    Raises:
        RuntimeError: ``prometheus_client`` was imported before multiprocess mode could be set up.
    """
    given = os.environ.get(MULTIPROC_ENV)
    if "prometheus_client" in sys.modules and not given:
        raise RuntimeError("prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR was set")
    if given:
        folder = Path(given)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in [*folder.glob("*.db"), folder / ANNOUNCED_FILE]:
            stale.unlink(missing_ok=True)  # prometheus_client: wipe the folder between runs
        return folder, False
    folder = Path(tempfile.mkdtemp(prefix="infotrace-metrics-"))
    os.environ[MULTIPROC_ENV] = str(folder)
    return folder, True
