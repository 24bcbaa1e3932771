"""One PNG per benchmark result: bench/results/<name>.json -> bench/results/<name>.png.

    python -m bench.plots [name ...]       # every result present when no name is given

In: the JSON files the benchmarks save. Out: PNG files beside them (matplotlib,
Agg backend, no display needed). quality, offline, latency, ingest and retrieval
have their own charts; any other result (freshness, ...) gets a generic
bar chart of its numeric latency/throughput/recall leaves, unless its module
exposes ``plot(result, path)``.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench._common import RESULTS


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _stamp(fig: Any, result: dict[str, Any]) -> None:
    m = result.get("machine", {})
    fig.text(0.99, 0.005, f"{m.get('date', '')}  commit {m.get('commit', '?')}  {m.get('cpus', '?')} CPUs",
             ha="right", va="bottom", fontsize=7, color="grey")


def _bars(ax: Any, groups: list[str], series: dict[str, list[float]], ylabel: str, fmt: str = "{:.3f}") -> None:
    n = max(len(series), 1)
    width = 0.8 / n
    for k, (label, values) in enumerate(series.items()):
        xs = [g + (k - (n - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, values, width, label=label)
        for bar, value in zip(bars, values, strict=True):
            ax.annotate(fmt.format(value), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)


def plot_quality(result: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    arms = result["arms"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    groups = ["HR@10", "NDCG@10", "HR@10 cold users", "NDCG@10 cold users", "HR@10 cold items"]
    _bars(left, groups, {name: [a["all"]["hr@10"], a["all"]["ndcg@10"], a["cold_users"]["hr@10"],
                                a["cold_users"]["ndcg@10"], a["cold_items"]["hr@10"]] for name, a in arms.items()},
          "accuracy")
    left.tick_params(axis="x", labelsize=7)
    left.set_title(f"prequential MovieLens-100K ({result['evaluated_events']:,} events, chunk {result['chunk']})")
    _bars(right, ["coverage", "diversity (ILD)", "novelty / 10 bits"],
          {name: [a["coverage"], a["diversity"], a["novelty"] / 10] for name, a in arms.items()}, "beyond accuracy")
    right.set_title("catalog coverage, intra-list genre diversity, novelty")
    _stamp(fig, result)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_offline(result: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    rows = {**result["ours"], **{f"{k} [published]": v for k, v in result["published"].items()}}
    fig, ax = plt.subplots(figsize=(12, 4.5))
    metrics = ["precision@10", "recall@10", "ndcg@10", "map"]
    _bars(ax, metrics, {name: [r[m] for m in metrics] for name, r in rows.items()}, "score")
    ax.set_title("MovieLens-100K, Recommenders protocol (stratified 75/25, top 10): ours vs published")
    _stamp(fig, result)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency(result: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    sizes = list(result["sizes"])
    labels = [f"{int(s):,}" for s in sizes]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    series = {}
    # p99 where it means something: the unsaturated run (older results: the saturated one).
    def low(row: dict[str, Any]) -> dict[str, Any]:
        return row.get("unsaturated") or row

    for p in ("cached", "live"):
        series[f"{p} p50"] = [low(result["sizes"][s][p])["p50_ms"] for s in sizes]
        series[f"{p} p99"] = [low(result["sizes"][s][p])["p99_ms"] for s in sizes]
    _bars(left, labels, series, "ms", fmt="{:.1f}")
    left.axhline(low(result["hello_world"])["p99_ms"], color="grey", linestyle="--", linewidth=1)
    left.set_title("GET /recommendations latency, unsaturated worker; dashed: hello-world p99")
    left.set_yscale("log")
    _bars(right, labels, {p: [result["sizes"][s][p]["rps"] for s in sizes] for p in ("cached", "live")},
          "requests/s", fmt="{:.0f}")
    right.axhline(result["hello_world"]["rps"], color="grey", linestyle="--", linewidth=1)
    right.set_title("throughput, one uvicorn worker; dashed: hello-world")
    right.set_yscale("log")
    _stamp(fig, result)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ingest(result: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    cases = [c for c in ("hello_world", "single", "batch_100") if c in result]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    _bars(left, cases, {"requests/s": [result[c]["rps"] for c in cases]}, "requests/s", fmt="{:.0f}")
    _bars(right, cases, {"p50": [result[c]["p50_ms"] for c in cases], "p99": [result[c]["p99_ms"] for c in cases]},
          "ms", fmt="{:.1f}")
    left.set_title("POST /interactions, one uvicorn worker")
    _stamp(fig, result)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_retrieval(result: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    sizes = result["sizes"]
    labels = [f"{row['items']:,} items" for row in sizes]
    sources = list(sizes[0]["per_source"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    groups = [*sources, "merged (1 in flight)", "merged (4 in flight)"]
    series = {}
    for label, row in zip(labels, sizes, strict=True):
        merged = [row["merged"]["concurrency_1"], row["merged"]["concurrency_4"]]
        for q in ("p50", "p99"):
            series[f"{label} {q}"] = [row["per_source"][s][f"{q}_ms"] for s in sources] + [m[f"{q}_ms"] for m in merged]
    _bars(left, groups, series, "ms", fmt="{:.0f}")
    left.axhline(sizes[0]["merged"]["budget_ms"], color="grey", linestyle="--", linewidth=1)
    left.tick_params(axis="x", labelsize=7)
    left.set_title(f"candidate sources alone and merged; dashed: {sizes[0]['merged']['budget_ms']:.0f} ms budget")
    keys = [k for k in sizes[0]["ann_recall"] if k.startswith("@")]
    _bars(right, keys, {label: [row["ann_recall"][k] for k in keys] for label, row in zip(labels, sizes, strict=True)},
          "recall vs exact")
    right.set_ylim(0.8, 1.01)
    right.set_title(f"ANN recall ({result['index']['index_type']} {result['index']['params']})", fontsize=8)
    _stamp(fig, result)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


KEYWORDS = ("p50", "p90", "p99", "rps", "per_s", "recall", "lag", "_ms", "ratio", "qps", "build_s", "hr@", "ndcg")


def numeric_leaves(node: Any, prefix: str = "") -> list[tuple[str, float]]:
    """(dotted path, value) of every number under ``node`` whose path names a measurement.

    List entries are labelled by their ``items``/``name``/``size`` field when they have one.
    """
    out: list[tuple[str, float]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("machine", "settings", "targets"):
                continue
            out += numeric_leaves(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(node, list):
        for n, value in enumerate(node):
            label = n
            if isinstance(value, dict):
                label = next((value[k] for k in ("items", "name", "size") if k in value), n)
            out += numeric_leaves(value, f"{prefix}[{label}]")
    elif isinstance(node, int | float) and not isinstance(node, bool):
        if any(k in prefix.lower() for k in KEYWORDS):
            out.append((prefix, float(node)))
    return out


def plot_generic(result: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    leaves = numeric_leaves(result)[:40]
    if not leaves:
        return
    fig, ax = plt.subplots(figsize=(12, max(3.0, 0.25 * len(leaves) + 1)))
    ax.barh([name for name, _ in leaves], [v for _, v in leaves])
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xscale("symlog")
    ax.set_title(path.stem)
    _stamp(fig, result)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PLOTTERS: dict[str, Callable[[dict[str, Any], Path], None]] = {
    "quality": plot_quality, "offline": plot_offline, "latency": plot_latency, "ingest": plot_ingest,
    "retrieval": plot_retrieval,
}


def plot(name: str) -> Path | None:
    """Draw results/<name>.png from results/<name>.json; None when there is no result."""
    source = RESULTS / f"{name}.json"
    if not source.exists():
        return None
    result = json.loads(source.read_text())
    target = RESULTS / f"{name}.png"
    plotter = PLOTTERS.get(name) or PLOTTERS.get(name.split("_", 1)[0])
    if plotter is None:
        try:
            plotter = getattr(importlib.import_module(f"bench.{name}"), "plot", None)
        except ImportError:
            plotter = None
    if plotter is None:
        if target.exists() and target.stat().st_mtime >= source.stat().st_mtime:
            return target  # drawn by its own benchmark after the result: keep it
        plotter = plot_generic
    plotter(result, target)
    return target if target.exists() else None


def main(argv: list[str] | None = None) -> int:
    names = argv if argv else sorted(p.stem for p in RESULTS.glob("*.json"))
    for name in names:
        target = plot(name)
        print(f"{name}: {target if target else 'no result'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
