"""What the benchmarks share: latency statistics, machine information and writing their reports.

:mod:`benchmarks.speed` and :mod:`benchmarks.load` summarise latencies with :func:`latency_stats`, describe
the machine with :func:`machine_info` and write their JSON and markdown with :func:`write_report_files`;
the quality harness (:mod:`benchmarks.quality.run`) describes the machine with :func:`harness_machine_info`
and writes its JSON with :func:`write_json`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np

__all__ = [
    "LATENCY_KEYS",
    "THREAD_ENV_VARS",
    "benchmark_parser",
    "distribution_versions",
    "harness_machine_info",
    "latency_stats",
    "load_average",
    "machine_info",
    "write_json",
    "write_report_files",
]

LATENCY_KEYS = ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms", "max_ms")
"""The statistics :func:`latency_stats` reports besides ``n``, each in milliseconds."""

THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")
"""Environment variables that size the thread pools of torch, BLAS and FAISS (reported as they are set)."""


@overload
def latency_stats(
    values_ms: Sequence[float], *, allow_empty: Literal[False] = False
) -> dict[str, float | int]: ...
@overload
def latency_stats(
    values_ms: Sequence[float], *, allow_empty: Literal[True]
) -> dict[str, float | int | None]: ...
def latency_stats(values_ms: Sequence[float], *, allow_empty: bool = False) -> dict[str, Any]:
    """Count, p50, p90, p99, mean, min and max of latencies in milliseconds.

    Args:
        values_ms: latencies in milliseconds.
        allow_empty: with no latencies, give ``n = 0`` and None for every statistic instead of raising
            (the load benchmark's per-kind rows may be empty; the speed benchmark's may not).

    Returns:
        ``n`` and :data:`LATENCY_KEYS` (``p50_ms`` ... ``max_ms``), the statistics in milliseconds.

    Raises:
        ValueError: no latencies and ``allow_empty`` is False.
    """
    a = np.asarray(values_ms, dtype=np.float64)
    if a.size == 0:
        if not allow_empty:
            raise ValueError("no latencies to summarise")
        return dict.fromkeys(LATENCY_KEYS, None) | {"n": 0}
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {
        "n": int(a.size),
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p99_ms": float(p99),
        "mean_ms": float(a.mean()),
        "min_ms": float(a.min()),
        "max_ms": float(a.max()),
    }


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (runnable processes; None where the platform has none)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def machine_info() -> dict[str, Any]:
    """The service benchmarks' machine record: platform, CPUs, thread pools, library versions, date.

    Returns:
        ``platform``, ``machine``, ``cpu_model``, ``cpu_count``, ``cpus_usable`` (CPUs this process may
        run on), ``torch_threads``, ``faiss_omp_threads``, ``thread_env`` (:data:`THREAD_ENV_VARS`),
        ``python``, ``versions`` (each module's ``__version__``), ``date_utc`` and ``loadavg_at_start``
        (:func:`load_average`).
    """
    import faiss
    import fastapi
    import httpx
    import pydantic
    import torch
    import uvicorn

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "torch_threads": torch.get_num_threads(),
        "faiss_omp_threads": faiss.omp_get_max_threads(),
        "thread_env": {key: os.environ.get(key) for key in THREAD_ENV_VARS},
        "python": platform.python_version(),
        "versions": {
            "torch": torch.__version__,
            "numpy": np.__version__,
            "faiss": faiss.__version__,
            "fastapi": fastapi.__version__,
            "uvicorn": uvicorn.__version__,
            "pydantic": pydantic.__version__,
            "httpx": httpx.__version__,
        },
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "loadavg_at_start": load_average(),
    }


def distribution_versions(distributions: Sequence[str]) -> dict[str, str | None]:
    """Installed version of each distribution (its package metadata), None for one not installed."""
    versions: dict[str, str | None] = {}
    for name in distributions:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def harness_machine_info(distributions: Sequence[str]) -> dict[str, Any]:
    """The quality harness's shorter machine record (no date: the result has its own).

    Args:
        distributions: the packages whose installed versions to record.

    Returns:
        ``platform``, ``processor``, ``cpu_count``, ``torch_threads``, ``python`` and ``versions``
        (:func:`distribution_versions`).
    """
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "versions": distribution_versions(distributions),
    }


def benchmark_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """A command line parser named ``prog`` whose description is the first paragraph of ``doc``."""
    return argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0] if doc else None)


def write_json(path: Path, data: Any, indent: int = 2) -> Path:
    """Write ``data`` as JSON (keys in their insertion order, a final newline), making the folder.

    Returns:
        ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent) + "\n")
    return path


def write_report_files(json_path: Path, report: dict[str, Any], markdown: str, markdown_name: str) -> Path:
    """Write ``report`` to ``json_path`` (:func:`write_json`) and ``markdown`` to ``markdown_name`` beside it.

    Returns:
        The markdown file's path.
    """
    write_json(json_path, report)
    markdown_path = json_path.parent / markdown_name
    markdown_path.write_text(markdown)
    return markdown_path
