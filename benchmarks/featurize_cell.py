"""One (method, model, batch size) cell of :mod:`benchmarks.featurize`, in a process of its own.

:func:`run_cell` (the parent side) starts ``python -m benchmarks.featurize_cell SPEC PROGRESS`` and watches
it: the child appends one JSON line per event to ``PROGRESS`` (``ready`` once imports, inputs and model are in
memory; ``setup``; one ``slice`` per featurize call; ``profile``; ``done`` or ``error``). The parent kills
the child when it passes its time budget with a slice still running, or its resident memory passes the cap.

Peak memory is the child's ``VmHWM`` (/proc/PID/status: the high-water resident set of the image the child
exec'd, so no cell's peak leaks into another's), read by the parent every poll and reported by the child
after every slice. Not ``ru_maxrss``: Linux carries the forking parent's resident high-water mark across
``exec`` into it, so every child would report at least this harness's own size.

The child's clock starts before the method's setup: it starts no slice once ``budget_s`` has passed, and
stops after the first whole pass over the inputs once ``min_seconds`` of slices after the first (the warm-up)
are timed, or after ``max_passes`` passes.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import latency_stats, load_average

__all__ = ["CellSpec", "run_cell", "main"]

PROJECT_ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 180.0
"""Longest wait for a child's imports, inputs and model (bergson's imports alone take about 10 s)."""
GRACE_S = 1.0
POLL_S = 0.05
MIB = 2**20


@dataclass(frozen=True)
class CellSpec:
    """What one child process measures.

    Attributes:
        method: a key of :data:`benchmarks.featurize_methods.METHODS`.
        model, kind, hidden: the :class:`~benchmarks.featurize_methods.BenchModel`.
        batch_size: examples per forward and backward pass.
        k: the total projected dimension asked for.
        seed: model and projection seed.
        budget_s: seconds of setup and slices before the cell stops (killed mid-slice at the limit).
        min_seconds: timed seconds (after the warm-up slice) to gather once a whole pass is done.
        max_passes: passes over the inputs at most.
        inputs: ``.npz`` file with ``x`` `(n, 784)` float32 and ``y`` `(n,)` int64.
        profile: run the slices under torch's profiler and report its table (not a timing run).
    """

    method: str
    model: str
    kind: str
    hidden: tuple[int, ...]
    batch_size: int
    k: int
    seed: int
    budget_s: float
    min_seconds: float
    max_passes: int
    inputs: str
    profile: bool = False


# ---- child --------------------------------------------------------------------------------------------


def _status_mib(field: str, pid: int | str = "self") -> float | None:
    """``VmRSS`` / ``VmHWM`` of a process from /proc, in MiB (None where there is no /proc)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / MIB
    except (OSError, ValueError):
        return None
    return None


def _busy_s() -> float | None:
    """Seconds of CPU time all processes have used since boot, summed over the CPUs (/proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _clocks() -> dict[str, float | None]:
    """This process's CPU seconds and the machine's (to tell how much of the CPUs others took)."""
    return {"cpu_s": time.process_time(), "busy_s": _busy_s()}


def _profile_rows(prof: Any, limit: int = 12) -> list[dict[str, Any]]:
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [
        {
            "op": e.key,
            "calls": int(e.count),
            "self_cpu_ms": e.self_cpu_time_total / 1000.0,
            "self_cpu_share": e.self_cpu_time_total / total,
        }
        for e in events[:limit]
    ]


def _run(spec: CellSpec, emit: Any) -> None:
    import numpy as np
    import torch

    from benchmarks.featurize_methods import BenchModel, make_method

    arrays = np.load(spec.inputs)
    x, y = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"])
    n = len(x)
    model = BenchModel(spec.model, spec.kind, tuple(spec.hidden)).build(spec.seed)
    method = make_method(spec.method)
    for module in method.imports:
        importlib.import_module(module)
    emit(
        "ready",
        rss_mib=_status_mib("VmRSS"),
        hwm_mib=_status_mib("VmHWM"),
        torch_threads=torch.get_num_threads(),
    )
    t0 = time.perf_counter()
    method.setup(model, spec.k, spec.seed, spec.batch_size, n * spec.max_passes)
    emit("setup", seconds=time.perf_counter() - t0, k=method.k, info=method.info, **_clocks())
    rows = method.slice_rows(spec.batch_size)
    profiler: Any = None
    if spec.profile:
        from torch.profiler import ProfilerActivity, profile

        profiler = profile(activities=[ProfilerActivity.CPU])
        profiler.__enter__()
    timed, out_of_time = 0.0, False
    for p in range(spec.max_passes):
        for start in range(0, n, rows):
            if time.perf_counter() - t0 >= spec.budget_s:
                out_of_time = True
                break
            started = time.perf_counter()
            phi = method.featurize(x[start : start + rows], y[start : start + rows], p * n + start)
            seconds = time.perf_counter() - started
            timed += seconds if (p, start) != (0, 0) else 0.0  # the first slice is the warm-up
            shape = None if phi is None else list(phi.shape)
            finite = None if phi is None else bool(np.isfinite(phi).all())
            emit(
                "slice", rows=min(rows, n - start), seconds=seconds, shape=shape, finite=finite,
                hwm_mib=_status_mib("VmHWM"), **_clocks(),
            )  # fmt: skip
        if out_of_time or timed >= spec.min_seconds:
            break
    if profiler is not None:
        profiler.__exit__(None, None, None)
        emit("profile", top=_profile_rows(profiler), parts=method.diagnose(x[:rows], y[:rows]))
    method.close()
    emit("done", hwm_mib=_status_mib("VmHWM"))


def main(argv: list[str] | None = None) -> int:
    """The child: ``python -m benchmarks.featurize_cell SPEC_JSON PROGRESS_PATH``."""
    spec_json, progress = argv if argv is not None else sys.argv[1:]
    spec = CellSpec(**json.loads(spec_json))
    with Path(progress).open("a") as out:

        def emit(event: str, **fields: Any) -> None:
            out.write(json.dumps({"event": event, "t": time.perf_counter()} | fields) + "\n")
            out.flush()

        try:
            _run(spec, emit)
        except Exception as exc:  # reported to the parent, which records the cell as failed
            emit("error", message=f"{type(exc).__name__}: {exc}"[:500])
            return 1
    return 0


# ---- parent -------------------------------------------------------------------------------------------


def _events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    events = []
    for line in lines:
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            break
    return events


def _log_tail(path: Path, lines: int = 3) -> str:
    try:
        return " | ".join(path.read_text().strip().splitlines()[-lines:])
    except OSError:
        return ""


def run_cell(
    spec: CellSpec, python: str, scratch: Path, name: str, rss_cap_bytes: int, n_examples: int
) -> dict[str, Any]:
    """Run one cell in a child process and summarise it.

    Args:
        spec: the cell. python: the interpreter (bergson's cells use the one it is installed for).
        scratch: a folder for the child's progress and log files. name: their stem.
        rss_cap_bytes: kill the child when its resident memory passes this.
        n_examples: the inputs' length (a whole pass).

    Returns:
        The cell's record: ``status`` (``ok``: at least one whole pass; ``partial``: some slices within the
        budget; ``dnf``: not one slice; ``memory``: stopped at the memory cap; ``failed``), ``note``,
        ``examples_per_s`` (the median slice's rate, over the slices after the first or the first alone),
        ``peak_rss_mib`` and the rest of what :mod:`benchmarks.featurize` reports.
    """
    progress, log = scratch / f"{name}.jsonl", scratch / f"{name}.log"
    progress.unlink(missing_ok=True)
    loadavg_before = load_average()
    started = time.monotonic()
    with log.open("w") as log_file:
        proc = subprocess.Popen(
            [python, "-m", "benchmarks.featurize_cell", json.dumps(asdict(spec)), str(progress)],
            cwd=PROJECT_ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=os.environ | {"PYTHONPATH": str(PROJECT_ROOT)},
        )
    deadline, stopped, hwm = started + READY_TIMEOUT_S, None, 0.0
    while True:
        pid, status = os.waitpid(proc.pid, os.WNOHANG)
        if pid:
            break
        now = time.monotonic()
        if deadline == started + READY_TIMEOUT_S and any(e["event"] == "ready" for e in _events(progress)):
            deadline = now + spec.budget_s + GRACE_S
        hwm = max(hwm, _status_mib("VmHWM", proc.pid) or 0.0)
        rss = _status_mib("VmRSS", proc.pid)
        if rss is not None and rss * MIB > rss_cap_bytes:
            stopped = "memory"
        elif now > deadline:
            stopped = "time"
        if stopped:
            os.kill(proc.pid, signal.SIGKILL)
            _, status = os.waitpid(proc.pid, 0)
            break
        time.sleep(POLL_S)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - started
    events = _events(progress)
    hwm = max([hwm, *(e["hwm_mib"] or 0.0 for e in events if "hwm_mib" in e)])
    return summarise(spec, events, hwm or None, stopped, wall, n_examples) | {
        "loadavg_before": loadavg_before,
        "loadavg_after": load_average(),
        "exit_code": proc.returncode,
        "log_tail": _log_tail(log) if proc.returncode else "",
    }


def others_cores(events: list[dict[str, Any]]) -> float | None:
    """CPUs' worth of time other processes used while the slices after the warm-up ran (from setup's end
    when there is only one slice): the machine's busy time less the child's, over the wall time."""
    marks = [e for e in events if e["event"] in ("setup", "slice") and e.get("busy_s") is not None]
    if len(marks) < 2:
        return None
    first, last = (marks[-2], marks[-1]) if len(marks) == 2 else (marks[1], marks[-1])
    wall = last["t"] - first["t"]
    if wall <= 0:
        return None
    return max(0.0, (last["busy_s"] - first["busy_s"] - (last["cpu_s"] - first["cpu_s"])) / wall)


def summarise(
    spec: CellSpec,
    events: list[dict[str, Any]],
    peak_rss_mib: float | None,
    stopped: str | None,
    wall_s: float,
    n_examples: int,
) -> dict[str, Any]:
    """A cell's record from its child's events (see :func:`run_cell`)."""
    by = {e["event"]: e for e in events}
    slices = [e for e in events if e["event"] == "slice"]
    timed = slices[1:] if len(slices) > 1 else slices
    rows, seconds = sum(e["rows"] for e in timed), sum(e["seconds"] for e in timed)
    # the median slice: robust to another process taking the cores for a moment
    rates = [e["rows"] / e["seconds"] for e in timed if e["seconds"] > 0]
    done = sum(e["rows"] for e in slices)
    ready_rss = by.get("ready", {}).get("rss_mib")
    shapes = [e["shape"] for e in slices if e["shape"] is not None]
    first_rows = slices[0]["rows"] if slices else min(n_examples, spec.batch_size)
    if "error" in by:
        status, note = "failed", by["error"]["message"]
    elif stopped == "memory":
        status, note = "memory", f"stopped at the memory cap after {done} examples"
    elif done >= n_examples:
        status, note = "ok", ""
    elif done:
        status, note = "partial", f"{done} of {n_examples} examples in the {spec.budget_s:.0f} s budget"
    elif stopped == "time" and "ready" in by:
        status, note = "dnf", f"did not finish {first_rows} examples in {spec.budget_s:.0f} s"
    else:
        status, note = "failed", "the child exited without a result"
    return {
        "method": spec.method,
        "model": spec.model,
        "batch_size": spec.batch_size,
        "k_requested": spec.k,
        "k": None if status == "failed" else by.get("setup", {}).get("k"),  # a failed cell gave no features
        "status": status,
        "note": note,
        "examples_per_s": statistics.median(rates) if rates else None,
        "mean_examples_per_s": rows / seconds if seconds > 0 else None,
        "examples_done": done,
        "others_cores": others_cores(events),
        "timed_examples": rows,
        "timed_seconds": seconds,
        "first_slice_s": slices[0]["seconds"] if slices else None,
        "slice_rows": slices[0]["rows"] if slices else None,
        "slice_ms": latency_stats([1000 * e["seconds"] for e in timed], allow_empty=True),
        "setup_s": by.get("setup", {}).get("seconds"),
        "peak_rss_mib": peak_rss_mib,
        "ready_rss_mib": ready_rss,
        "peak_above_ready_mib": peak_rss_mib - ready_rss if peak_rss_mib and ready_rss else None,
        "features_k": sorted({s[1] for s in shapes}),
        "features_finite": all(e["finite"] for e in slices if e["finite"] is not None),
        "info": by.get("setup", {}).get("info", {}),
        "profile": by.get("profile", {}).get("top"),
        "profile_parts": by.get("profile", {}).get("parts"),
        "wall_s": wall_s,
        "budget_s": spec.budget_s,
        "torch_threads": by.get("ready", {}).get("torch_threads"),
    }


if __name__ == "__main__":
    sys.exit(main())
