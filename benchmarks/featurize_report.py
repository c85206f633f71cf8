"""The featurization benchmark's targets, markdown report (``FEATURIZE.md``) and scaling plot.

``python -m benchmarks.featurize_report benchmarks/results/featurize.json`` writes the markdown and the plot
again from a run's JSON (no cell is re-run).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import write_report_files
from benchmarks.featurize_methods import METHOD_LABELS, METHODS

__all__ = ["cell", "k_check", "main", "markdown", "plot_scaling", "rate", "targets", "write_report"]

TARGET_VS_TRAKER = 20.0
TARGET_VS_FLOOR = 2.0
TARGET_BIG_RATE = 200.0
MEASURED = ("ok", "partial")


def cell(
    report: dict[str, Any], method: str, model: str, group: str = "main", batch: int | None = None
) -> dict:
    """The cell of ``method`` on ``model`` (at the run's batch size unless ``batch``), or an empty dict."""
    batch = batch or report["settings"]["batch_size"]
    for c in report["cells"]:
        if (c["method"], c["model"], c["group"], c["batch_size"]) == (method, model, group, batch):
            return c
    return {}


def rate(report: dict[str, Any], method: str, model: str) -> float | None:
    """The examples/s a main cell measured (None: it finished no slice, or did not run)."""
    c = cell(report, method, model)
    return c["examples_per_s"] if c.get("status") in MEASURED else None


def _role(report: dict[str, Any], role: str) -> str:
    return next(key for key, m in report["models"].items() if role in m["roles"])


def _has_role(report: dict[str, Any], role: str) -> bool:
    return any(role in m["roles"] for m in report["models"].values())


def k_check(report: dict[str, Any]) -> dict[str, Any]:
    """Per model: the k of each method that featurized (or ran out of time: its k is its setup's), and
    whether they lie within 5% of each other (max / min <= 1.05)."""
    out = {}
    for key in report["models"]:
        ks = {c["method"]: c["k"] for c in report["cells"] if c["model"] == key and c["group"] == "main"}
        ks = {method: k for method, k in ks.items() if k}
        ratio = max(ks.values()) / min(ks.values()) if ks else None
        out[key] = {"k": ks, "max_over_min": ratio, "within_5pct": ratio is not None and ratio <= 1.05}
    return out


def _ratio_target(
    report: dict[str, Any], what: str, model: str, top: str, bottom: str, threshold: float, at_least: bool
) -> dict[str, Any]:
    """``rate(top) / rate(bottom)`` against a threshold; a bottom that finished no batch gives a bound."""
    a, b = rate(report, top, model), rate(report, bottom, model)
    bound = None
    c = cell(report, bottom, model)
    if a is not None and b is None and c.get("status") == "dnf":
        b, bound = report["settings"]["batch_size"] / c["budget_s"], "lower"  # it was slower than this
    value = a / b if a is not None and b else None
    met = None if value is None else (value >= threshold if at_least else value <= threshold)
    return {
        "what": what,
        "model": model,
        "measured": value,
        "bound": bound,
        "threshold": threshold,
        "met": met,
    }


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with what was measured and whether it is met (None: not measured)."""
    main, big = _role(report, "main"), _role(report, "big")
    out = [
        _ratio_target(
            report, "kronecker examples/s / traker examples/s >= 20", main, "kronecker", "traker",
            TARGET_VS_TRAKER, True,
        )
    ]  # fmt: skip
    roles = ["main", "cnn", "cnn-plain", "big"]
    for key in dict.fromkeys(_role(report, r) for r in roles if _has_role(report, r)):
        floor, kron = rate(report, "floor", key), rate(report, "kronecker", key)
        value = floor / kron if floor and kron else None
        out.append(
            {
                "what": "floor examples/s / kronecker examples/s <= 2 (kronecker within 2x of the floor)",
                "model": key,
                "measured": value,
                "bound": None,
                "threshold": TARGET_VS_FLOOR,
                "met": None if value is None else value <= TARGET_VS_FLOOR,
            }
        )
    big_rate = rate(report, "kronecker", big)
    out.append(
        {
            "what": "kronecker examples/s on the large MLP >= 200",
            "model": big,
            "measured": big_rate,
            "bound": None,
            "threshold": TARGET_BIG_RATE,
            "met": None if big_rate is None else big_rate >= TARGET_BIG_RATE,
        }
    )
    return out


# ---- markdown -----------------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    if digits == 0 and abs(value) >= 10:
        return f"{value:,.0f}"
    return f"{value:,.{max(digits, 1)}f}"


def _rate_text(c: dict[str, Any]) -> str:
    status = c.get("status")
    if status == "ok":
        return _num(c["examples_per_s"])
    if status == "partial":
        return f"{_num(c['examples_per_s'], 1)} (partial)"
    if status == "dnf":
        return f"did not finish {c.get('slice_rows') or c['batch_size']} examples in {c['budget_s']:.0f} s"
    return {"skipped": "not run (memory)", "not_installed": "not installed", "memory": "memory cap"}.get(
        status or "", "failed"
    )


def _main_table(report: dict[str, Any], key: str) -> list[str]:
    kron = rate(report, "kronecker", key)
    lines = [
        "| method | k | examples/s | kronecker is x faster | peak MiB | above start MiB | setup s "
        "| others' CPUs | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for method in METHODS:
        c = cell(report, method, key)
        r = rate(report, method, key)
        faster = f"{kron / r:,.1f}" if kron and r and method != "kronecker" else ""
        note = "" if c.get("status") == "dnf" else c.get("note", "").replace("|", "/")  # dnf: in its rate
        lines.append(
            f"| {METHOD_LABELS[method]} | {c.get('k') or '-'} | {_rate_text(c)} | {faster} | "
            f"{_num(c.get('peak_rss_mib'))} | {_num(c.get('peak_above_ready_mib'))} | "
            f"{_num(c.get('setup_s'), 2)} | {_num(c.get('others_cores'), 2)} | {note} |"
        )
    return lines


def _targets_table(report: dict[str, Any]) -> list[str]:
    lines = ["| target | model | measured | met |", "|---|---|---:|---|"]
    for t in report["targets"]:
        value = "-" if t["measured"] is None else f"{t['measured']:,.2f}"
        if t["bound"] == "lower":
            value = f"> {value}"
        met = {True: "**yes**", False: "**no**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['what']} | {report['models'][t['model']]['label']} | {value} | {met} |")
    return lines


def _sweep_models(report: dict[str, Any]) -> list[str]:
    mlps = [k for k, m in report["models"].items() if m["kind"] == "mlp"]
    return sorted(mlps, key=lambda k: report["models"][k]["n_params"])


def _sweep_tables(report: dict[str, Any]) -> list[str]:
    head = "| MLP | P | " + " | ".join(METHOD_LABELS[m] for m in METHODS) + " |"
    rule = "|---|---:|" + "---:|" * len(METHODS)
    rates, peaks = [head, rule], [head, rule]
    for key in _sweep_models(report):
        m = report["models"][key]
        cells = [cell(report, method, key) for method in METHODS]
        start = f"| {m['label']} | {m['n_params']:,} | "
        rates.append(start + " | ".join(_rate_text(c) for c in cells) + " |")
        peaks.append(start + " | ".join(_num(c.get("peak_above_ready_mib")) for c in cells) + " |")
    return [
        "examples/s:",
        "",
        *rates,
        "",
        "peak resident memory above the process's start (MiB):",
        "",
        *peaks,
    ]


def _memory_table(report: dict[str, Any]) -> list[str]:
    s = report["settings"]
    batches = sorted({s["batch_size"], *s["memory_batches"]})
    lines = [
        "| MLP | P | a dense R, P x k x 4 bytes (MiB) | "
        + " | ".join(f"kronecker, batch {b}" for b in batches)
        + " | dense, batch "
        + str(s["batch_size"])
        + " |",
        "|---|---:|---:|" + "---:|" * (len(batches) + 1),
    ]
    for w in s["memory_widths"]:
        key = f"mlp-{w}"
        m = report["models"][key]
        row = [
            cell(report, "kronecker", key, "memory" if b != s["batch_size"] else "main", b) for b in batches
        ]
        dense = cell(report, "dense", key)
        dense_text = _rate_text(dense)  # not run: why
        if dense.get("peak_above_ready_mib") is not None:
            dense_text = _num(dense["peak_above_ready_mib"])
            dense_text += "" if dense["status"] == "ok" else f" (stopped: {dense['note']})"
        lines.append(
            f"| {m['label']} | {m['n_params']:,} | {_num(m['dense_r_mib'])} | "
            + " | ".join(_num(c.get("peak_above_ready_mib"), 1) for c in row)
            + f" | {dense_text} |"
        )
    return lines


def _k_table(report: dict[str, Any]) -> list[str]:
    lines = ["| model | " + " | ".join(m for m in METHODS if m != "floor") + " | max / min | within 5% |"]
    lines.append("|---|" + "---:|" * (len(METHODS) - 1) + "---:|---|")
    for key, check in report["k_check"].items():
        ks = [str(check["k"].get(m, "-")) for m in METHODS if m != "floor"]
        ratio = "-" if check["max_over_min"] is None else f"{check['max_over_min']:.3f}"
        ok = "yes" if check["within_5pct"] else "**no**"
        lines.append(f"| {report['models'][key]['label']} | " + " | ".join(ks) + f" | {ratio} | {ok} |")
    return lines


def _parts_line(c: dict[str, Any]) -> list[str]:
    parts = c.get("profile_parts") or {}
    if "rest_ms" not in parts:
        return []
    share = parts["rest_ms"] / parts["featurize_ms"]
    return [
        f"Of {parts['featurize_ms']:.1f} ms per batch of {parts['rows']} (median, outside the profiler), the "
        f"rest block's per-example gradients of its {parts['rest_params']} parameters (a `vmap` over the "
        "whole network, `per_example_gradients(..., names=plan.rest.params)`) take "
        f"{parts['rest_ms']:.1f} ms ({100 * share:.0f}%).",
        "",
    ]


def _profile_lines(report: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for c in report["cells"]:
        if c["group"] != "profile" or not c.get("profile"):
            continue
        label = report["models"][c["model"]]["label"]
        lines += [f"**{METHOD_LABELS[c['method']]}, {label}** (torch profiler, self CPU time by op):", ""]
        lines += _parts_line(c)
        lines += ["| op | calls | self CPU ms | share |", "|---|---:|---:|---:|"]
        for row in c["profile"][:8]:
            share = 100 * row["self_cpu_share"]
            lines.append(f"| `{row['op']}` | {row['calls']} | {row['self_cpu_ms']:,.1f} | {share:.0f}% |")
        lines.append("")
    return lines


def _contended(report: dict[str, Any]) -> str:
    timed = [c for c in report["cells"] if c.get("others_cores") is not None]
    over = [c for c in timed if c["others_cores"] > report["contended_cores"]]
    again = sum(len(c.get("attempts", [])) > 1 for c in timed)
    return f"{again} of {len(timed)} cells were re-run, {len(over)} stayed above it"


def _plain_cnn_lines(report: dict[str, Any]) -> list[str]:
    if not _has_role(report, "cnn-plain"):
        return []
    key, cnn_key = _role(report, "cnn-plain"), _role(report, "cnn")
    m = report["models"][key]
    lines = [f"## {m['label']} ({m['n_params']:,} parameters)", ""]
    kron, plain = rate(report, "kronecker", cnn_key), rate(report, "kronecker", key)
    floor, plain_floor = rate(report, "floor", cnn_key), rate(report, "floor", key)
    if kron and plain and floor and plain_floor:
        lines += [
            "The same CNN without its BatchNorm layers, so that every parameter is in a Kronecker block: "
            f"kronecker {plain:,.0f} examples/s against {kron:,.0f} with BatchNorm (the floor: "
            f"{plain_floor:,.0f} against {floor:,.0f}), i.e. {plain_floor / plain:.2f}x the floor's time "
            f"against {floor / kron:.2f}x.",
            "",
        ]
    return [*lines, *_main_table(report, key), ""]


def _method_notes(report: dict[str, Any]) -> list[str]:
    v = report["versions"]
    bergson = (
        f"bergson {v['bergson']}, installed by `make bench-featurize` in `var/bergson-venv`, a venv of "
        "its own over `.venv`'s packages (torch held at the CPU 2.13.0: unpinned, pip would install a "
        "CUDA torch for the newest torchvision; PyPI's torchvision and torchaudio, CUDA builds whose C ops "
        "cannot load against the CPU torch, are removed, as bergson's collectors never import them)"
        if v.get("bergson")
        else "bergson: not installed for this run"
    )
    return [
        "- infotrace kronecker: `plan_kronecker(model, k, seed, fired=fired_modules(model, probe))` and "
        "`HookFeaturizer(model, plan).featurize(ClassificationMargin(), x, y)` per batch, which is what "
        "`tangent_features` does for each buffer.",
        "- infotrace dense: `DenseFeaturizer(model, DenseProjection(P, k, seed)).featurize_buffer` over "
        "the buffers `tangent_features` makes at its default 256 MiB (one batch per buffer once P passes "
        "about 520k), so R (`P x k`, generated in 4,096-row blocks) is regenerated for every buffer.",
        f"- traker {v.get('traker')}: `TRAKer.featurize` (task `image_classification`, whose model output "
        "is the margin), its CPU `BasicProjector` (Gaussian, float32, traker's default block size 100: a "
        "`(P, 100)` matrix regenerated for each block of k) and its memmap store, wired as the quality "
        "harness wires it.",
        f"- dattri {v.get('dattri')}: the featurization inside `TRAKAttributor.cache`, batch by batch: "
        "its vmapped `grad_loss_func` (the margin), divided by `sqrt(P)`, `random_project` on the CPU "
        "(Gaussian, `proj_max_batch_size` 32) and the `Q = 1 - p` term; the k x k solve at the end of "
        "`cache` is not timed.",
        f"- {bergson}: its `InMemoryCollector` (per-module two-sided projection, `p x p` per Linear with "
        "biases, Gaussian) around one forward and one `backward` of the summed margin per batch. Its "
        "hooks want `[N, S, I]` activations, so an MLP gets a length-1 sequence axis; a Conv2d's "
        "`[N, C, H, W]` input fails its forward hook's assertion, so it has no CNN result.",
        "- floor: `cross_entropy(model(x), y).backward()` per batch (parameter gradients of the batch "
        "loss, nothing per example).",
        "",
    ]


def markdown(report: dict[str, Any]) -> str:
    """The ``FEATURIZE.md`` report."""
    s, machine = report["settings"], report["machine"]
    main, cnn_key, big = _role(report, "main"), _role(report, "cnn"), _role(report, "big")
    load = machine.get("loadavg_at_start") or []
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v)
    lines = [
        "# Featurization benchmark",
        "",
        f"Generated by `make bench-featurize` (`python -m benchmarks.featurize`, {report['mode']} mode) on "
        f"{machine['date_utc']}: {machine['cpu_model']}, {machine['cpus_usable']} CPUs usable, torch "
        f"{machine['torch_threads']} threads; {versions}. Load average at the start "
        f"{', '.join(f'{v:.2f}' for v in load)} (1, 5, 15 min), at the end "
        f"{', '.join(f'{v:.2f}' for v in machine.get('loadavg_at_end') or [])}: other work on this machine "
        "shares the cores, so each cell's load before and after is in the JSON. The whole run took "
        f"{report['benchmark_wall_seconds'] / 60:.1f} min.",
        "",
        f"Inputs: {s['inputs']['n']} {s['inputs']['source']}. Batch {s['batch_size']}, k = {s['k']} asked "
        f"of every method (what each gives is in the k column), seed {s['seed']}, untrained seeded models in "
        f"eval mode. Each cell runs in its own process with a {s['budget_s']:.0f} s budget (setup and "
        "featurization); examples/s is the median rate of the featurize calls after the first (the warm-up), "
        f"over whole passes until {s['min_seconds']:g} s are timed; 'partial' means fewer than "
        f"{s['inputs']['n']} examples finished in the budget. Peak memory is the process's `VmHWM` (its "
        "resident high-water mark); 'above start' subtracts its resident size once imports, inputs and model "
        "were loaded. Per-example-gradient methods are not started when their estimate passes the memory cap "
        f"({s['rss_cap_mib'] / 1024:.1f} GiB). \"Others' CPUs\" is how many CPUs' worth of time other "
        "processes took during a cell's timed calls (the machine's busy time less the cell's own); a cell "
        f"above {report['contended_cores']:g} was run again when the retry time allowed and the least "
        f"contended attempt kept: {_contended(report)}.",
        "",
        "## Targets",
        "",
        *_targets_table(report),
        "",
        f"## {report['models'][main]['label']} ({report['models'][main]['n_params']:,} parameters)",
        "",
        *_main_table(report, main),
        "",
        f"## {report['models'][cnn_key]['label']} ({report['models'][cnn_key]['n_params']:,} parameters)",
        "",
        "BatchNorm's scales and shifts are not a supported layer: the Kronecker plan dense-projects them "
        "from their own per-example gradients (its rest block), which hooks on the BatchNorm layers give "
        "from the same forward and backward pass (no vmap).",
        "",
        *_main_table(report, cnn_key),
        "",
        *_plain_cnn_lines(report),
        f"## {report['models'][big]['label']} ({report['models'][big]['n_params']:,} parameters)",
        "",
        *_main_table(report, big),
        "",
        "## Scaling with P",
        "",
        "![examples/s and peak memory against P](featurize_scaling.png)",
        "",
        *_sweep_tables(report),
        "",
        "## Kronecker's memory grows with the batch and the layer widths, not with P x k",
        "",
        "Peak resident memory above the process's start (MiB). Kronecker holds the batch's activations, "
        "the projected sides `(B, T, k_row)` and `(B, T, k_col)` and its `(d, k_side)` matrices; a dense "
        "projection holds `(B, P)` per-example gradients and generates R (`P x k`) block by block.",
        "",
        *_memory_table(report),
        "",
        "## k per method",
        "",
        *_k_table(report),
        "",
        "## Where the time goes",
        "",
        *_profile_lines(report),
        "## How each method is called",
        "",
        *_method_notes(report),
    ]
    return "\n".join(lines) + "\n"


def write_report(json_path: Path, report: dict[str, Any]) -> Path:
    """Write the JSON and ``FEATURIZE.md`` beside it; returns the markdown's path."""
    return write_report_files(json_path, report, markdown(report), "FEATURIZE.md")


# ---- plot ---------------------------------------------------------------------------------------------


def plot_scaling(report: dict[str, Any], path: Path) -> Path:
    """``featurize_scaling.png``: examples/s (left) and peak memory above start (right) against P, log-log,
    one line per method, over the MLPs; cells that finished no batch have no point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = _sweep_models(report)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for method in METHODS:
        points = [
            (report["models"][k]["n_params"], rate(report, method, k), cell(report, method, k)) for k in keys
        ]
        rated = [(p, r) for p, r, _ in points if r]
        if rated:
            left.plot(*zip(*rated, strict=True), marker="o", label=METHOD_LABELS[method])
        peaks = [(p, c["peak_above_ready_mib"]) for p, _, c in points if c.get("peak_above_ready_mib")]
        if peaks:
            right.plot(*zip(*peaks, strict=True), marker="o", label=METHOD_LABELS[method])
    left.axhline(TARGET_BIG_RATE, color="grey", linestyle=":", linewidth=1, label="200 examples/s")
    s = report["settings"]
    left.set(
        xscale="log", yscale="log", xlabel="P (parameters)", ylabel="examples/s",
        title=f"MLP 784-w-w-10, batch {s['batch_size']}, k = {s['k']}",
    )  # fmt: skip
    right.set(
        xscale="log", yscale="log", xlabel="P (parameters)", ylabel="MiB",
        title="peak resident memory above the process's start",
    )  # fmt: skip
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = left.get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="lower center", bbox_to_anchor=(0.5, 0.035), ncol=4, fontsize=8, frameon=False
    )
    fig.text(
        0.01, 0.01,
        f"left, no point: not one batch in the {s['budget_s']:.0f} s budget, or not run (memory cap); "
        "right: a cell stopped at its budget shows its peak until then",
        fontsize=7,
    )  # fmt: skip
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> Path:
    """Write ``FEATURIZE.md`` and ``featurize_scaling.png`` again beside a run's JSON (k check and targets
    recomputed)."""
    (json_path,) = argv if argv is not None else sys.argv[1:]
    path = Path(json_path)
    report = json.loads(path.read_text())
    report["k_check"], report["targets"] = k_check(report), targets(report)
    plot_scaling(report, path.parent / "featurize_scaling.png")
    return write_report(path, report)


if __name__ == "__main__":
    main()
