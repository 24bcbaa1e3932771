"""The benchmark CLI: run one benchmark or all, then redraw the plots and the summary table.

    python -m bench                       # = all (what `make bench` runs)
    python -m bench quality [-- --chunk 50]
    python -m bench offline | latency | freshness | ingest | retrieval | summary

In: the embedded stack (`make up`: broker, Redis, Milvus) for every benchmark
but ``offline``. Out: bench/results/<name>.json (each benchmark's own
``main()`` saves it), <name>.png (bench.plots) and bench/results/README.md, the
summary table (machine, date, commit, headline figures), rebuilt from every
result present. Arguments after ``--`` go to the one benchmark named.

``all`` runs, in order: offline, quality, ingest, freshness, retrieval,
latency; a benchmark whose module does not exist yet is reported as missing,
a failing one is reported and the rest still run (exit status 1 then).

The synthetic catalogues retrieval and latency share (bench/synthetic.py:
100k and 1M items; the 1M one takes minutes to insert and index on 2 cores)
are built in a child process while ``offline`` runs: offline is
single-process CPU work whose figures are list metrics, not timings, and the
build is mostly Milvus' own threads, so on 2 cores the two overlap instead
of adding up; the next benchmark waits for the build, since it would distort
their latencies. Catalogues are kept for the next run and released from Milvus
memory at the end. Each step prints its time and an estimate of what is left
from the last full run (results/last_run.txt).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bench._common import RESULTS

ORDER = ["offline", "quality", "ingest", "freshness", "retrieval", "latency"]
# The shared synthetic catalogues' sizes, and the benchmarks that may run while they are built:
# pure computation whose figures are list metrics (every other one measures the live stack's
# latency or throughput, which a concurrent bulk load would distort).
SYNTHETIC_SIZES = (100_000, 1_000_000)
BESIDE_PREBUILD = ("offline",)
WHAT = {
    "offline": "MovieLens-100K, Recommenders protocol (stratified 75/25, top 10)",
    "quality": "MovieLens-100K prequential replay through the running system (80% warm-up, top 10)",
    "ingest": "POST /interactions on one uvicorn worker vs a FastAPI hello-world",
    "freshness": "event -> feature visible, event -> cached list changed",
    "retrieval": "ANN recall and latency",
    "latency": "GET /recommendations, cached and live paths, one uvicorn worker vs hello-world",
    "ab": "GET /recommendations on two revisions side by side, runs alternating (python -m bench.ab)",
    # Written by the chaos tests (make test), not by python -m bench; the summary lists it.
    "reliability": "Redis, broker and Milvus killed while serving and ingesting: what clients saw, events lost",
}


def run_one(name: str, argv: list[str]) -> tuple[str, float]:
    """Import bench.<name> and call its main(); returns (status, seconds)."""
    if importlib.util.find_spec(f"bench.{name}") is None:
        return "missing (module not written yet)", 0.0
    started = time.perf_counter()
    try:
        module = importlib.import_module(f"bench.{name}")
        main = module.main
        code = main(argv) if inspect.signature(main).parameters else main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code not in (None, 0) and not isinstance(exc.code, int):
            print(f"{name}: {exc.code}", file=sys.stderr)
    except Exception:  # noqa: BLE001 (one failing benchmark must not stop the others)
        traceback.print_exc()
        code = 1
    seconds = time.perf_counter() - started
    return ("ok" if not code else f"failed (exit {code})"), seconds


class SyntheticPrebuild:
    """Builds (or finds) the shared synthetic catalogues in a child process; ``wait()`` before they are read.

    A process, not a thread: building a million rows is Python work that would
    otherwise contend for the GIL with the benchmark running beside it.
    """

    def __init__(self, sizes: tuple[int, ...] = SYNTHETIC_SIZES) -> None:  # noqa: D107
        # Left unloaded: retrieval, the first to read them, loads them while it measures Milvus
        # memory (released, then loaded), so a load here (9 s at 1M) would be done twice.
        self.argv = [sys.executable, "-m", "bench.synthetic", "--sizes", ",".join(map(str, sizes)), "--no-load"]
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.seconds: float | None = None

    def start(self) -> SyntheticPrebuild:
        self.started = time.perf_counter()
        self.process = subprocess.Popen(self.argv)
        return self

    def wait(self) -> None:
        if self.process is None or self.seconds is not None:
            return
        if self.process.poll() is None:
            tqdm.write("== waiting for the synthetic catalogues (bench/synthetic.py) ...")
        code = self.process.wait()
        self.seconds = time.perf_counter() - self.started
        if code:
            tqdm.write(f"== synthetic catalogue prebuild failed (exit {code}); the benchmarks build them")


def release_synthetic() -> None:
    """Unload the synthetic catalogues from Milvus memory (kept on disk for the next run)."""
    try:
        from bench.synthetic import release_synthetic_catalogs, synthetic_settings
        from serving.config import load_settings

        release_synthetic_catalogs(synthetic_settings(load_settings()))
    except Exception as exc:  # noqa: BLE001 (the figures are saved; a busy Milvus must not fail the run)
        print(f"releasing the synthetic catalogues failed: {exc!r}", file=sys.stderr)


def last_run_seconds() -> dict[str, float]:
    """Per-benchmark seconds of the last full run (for the progress estimate), {} if none."""
    try:
        saved = json.loads((RESULTS / "last_run.txt").read_text())
        return {n: float(t) for n, (_, t) in saved["statuses"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


# -- the summary ------------------------------------------------------------------------------------
def _f(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "-" if value is None else str(value)


def _quality(r: dict[str, Any]) -> list[str]:
    lines = [f"Protocol: {r['protocol']}.", "",
             "| arm | HR@10 | NDCG@10 | HR@10 cold users | NDCG@10 cold users | HR@10 cold items "
             "| coverage | diversity | novelty (bits) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, a in r["arms"].items():
        lines.append(f"| {name} | {_f(a['all']['hr@10'], 4)} | {_f(a['all']['ndcg@10'], 4)} | "
                     f"{_f(a['cold_users']['hr@10'], 4)} | {_f(a['cold_users']['ndcg@10'], 4)} | "
                     f"{_f(a['cold_items']['hr@10'], 4)} | {_f(a['coverage'])} | {_f(a['diversity'])} | "
                     f"{_f(a['novelty'], 2)} |")
    first = next(iter(r["arms"].values()))
    lines.append("")
    lines.append(f"Events evaluated: {first['all']['events']:,} (cold users {first['cold_users']['events']:,}, "
                 f"cold items {first['cold_items']['events']:,}).")
    if "system" in r["arms"] and "most-popular" in r["arms"]:
        ratio = r["arms"]["system"]["all"]["ndcg@10"] / max(r["arms"]["most-popular"]["all"]["ndcg@10"], 1e-9)
        lines.append(f"System NDCG@10 / most-popular NDCG@10 = **{ratio:.2f}** (issue 5 target: >= 2).")
    if "system" in r:
        lines.append(f"System lists served from: {r['system'].get('served_from')}.")
    if "system_error" in r:
        lines.append(f"**The live system did not run**: {r['system_error']}")
    return lines


def _offline(r: dict[str, Any]) -> list[str]:
    lines = [f"Protocol: {r['protocol']}. Published figures: {r['published_source']}.", "",
             "| algorithm | precision@10 | recall@10 | NDCG@10 | MAP |", "|---|---|---|---|---|"]
    for label, rows in (("", r["ours"]), (" (published)", r["published"])):
        for name, m in rows.items():
            lines.append(f"| {name}{label} | {_f(m['precision@10'], 4)} | {_f(m['recall@10'], 4)} | "
                         f"{_f(m['ndcg@10'], 4)} | {_f(m['map'], 4)} |")
    return lines


def _latency(r: dict[str, Any]) -> list[str]:
    h = r["hello_world"]

    def low(x: dict[str, Any], key: str) -> str:  # the unsaturated run (absent in older results)
        return _f((x.get("unsaturated") or {}).get(key), 2)

    c = (h.get("unsaturated") or {}).get("connections", "-")
    # The cached path's interleaved rounds per size (absent in older results).
    rounds_by_size = {size: row["cached"]["rounds"] for size, row in r["sizes"].items() if row["cached"].get("rounds")}
    rounds = len(next(iter(rounds_by_size.values()), []))
    lines = [f"Saturated: {h.get('connections', '-')} connections on one worker (requests/s; latency there is "
             f"queueing). Unsaturated: {c} connection(s), where p99 targets are read."
             + (f" Cached req/s and ratio: the median of {rounds} rounds, each run right after a hello-world run "
                "driven by the same wrk script (the hello-world row is a run of its own at the start)."
                if rounds else ""), "",
             "| items | path | req/s | x hello-world req/s | p50 ms | p99 ms | p50 ms unsaturated "
             "| p99 ms unsaturated | non-2xx | served_from (sample) | API peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|",
             f"| - | hello-world | {_f(h['rps'], 0)} | 1.00 | {_f(h['p50_ms'], 2)} | {_f(h['p99_ms'], 2)} | "
             f"{low(h, 'p50_ms')} | {low(h, 'p99_ms')} | {h['non2xx']} | - | {_f(h.get('peak_rss_mb'), 0)} |"]
    for size, row in r["sizes"].items():
        for path in ("cached", "live"):
            p = row[path]
            lines.append(f"| {int(size):,} | {path} | {_f(p['rps'], 0)} | {_f(p.get('ratio_to_hello_world'), 3)} | "
                         f"{_f(p['p50_ms'], 2)} | {_f(p['p99_ms'], 2)} | {low(p, 'p50_ms')} | {low(p, 'p99_ms')} | "
                         f"{p['non2xx']} | {p.get('served_from_sample')} | {_f(p.get('api_peak_rss_mb'), 0)} |")
    if rounds_by_size:
        lines += ["", "Cached rounds, ratio to the hello-world run just before each (hello-world req/s): " + "; ".join(
            f"{int(size):,} items " + ", ".join(f"{x['ratio_to_hello_world']:.2f} ({x['hello_world_rps']:,.0f})"
                                                for x in rounds) for size, rounds in rounds_by_size.items()) + "."]
        cpu = {size: rounds for size, rounds in rounds_by_size.items() if "cpu_ratio_to_hello_world" in rounds[0]}
        if cpu:
            lines += ["", "The same rounds by each server's own CPU per request (hello-world / cached: the req/s "
                      "ratio each would reach on a core of its own; cores each server got in brackets): " + "; ".join(
                          f"{int(size):,} items " + ", ".join(
                              f"{x['cpu_ratio_to_hello_world']:.2f} ({x['hello_world_cores']:.2f} / "
                              f"{x['server_cores']:.2f})" for x in rounds) for size, rounds in cpu.items()) + "."]
    mem = r.get("memory", {})
    if mem:
        lines.append("")
        lines.append(f"Milvus server peak RSS {_f(mem.get('milvus_peak_rss_mb'), 0)} MB, Redis peak "
                     f"{_f(mem.get('redis_used_memory_peak_mb'), 0)} MB (shared services, all tenants).")
    return lines


def _ingest(r: dict[str, Any]) -> list[str]:
    lines = ["| case | req/s | events/s | p50 ms | p99 ms | non-2xx |", "|---|---|---|---|---|---|"]
    for case in ("hello_world", "single", "batch_100"):
        if case in r:
            c = r[case]
            per = 100 if case == "batch_100" else 1
            lines.append(f"| {case} | {_f(c['rps'], 0)} | {_f(c['rps'] * per, 0)} | {_f(c['p50_ms'], 2)} | "
                         f"{_f(c['p99_ms'], 2)} | {c['non2xx']} |")
    return lines


def _retrieval(r: dict[str, Any]) -> list[str]:
    if "index" not in r:  # older side runs have another shape
        return _generic(r)
    lines = [f"Vector index {r['index']['index_type']} {r['index']['params']}, ef_search {r['ef_search']}; "
             f"quotas {r['quotas']}."
             + (f" {' and '.join(r['shared_index_call'])} share one Milvus call per request: each of their rows "
                "times that call." if r.get("shared_index_call") else ""), "",
             "| items | source | p50 ms | p99 ms |", "|---|---|---|---|"]
    for row in r["sizes"]:
        for source, f in row["per_source"].items():
            lines.append(f"| {row['items']:,} | {source} | {_f(f['p50_ms'], 2)} | {_f(f['p99_ms'], 2)} |")
        for label, f in row["merged"].items():
            if isinstance(f, dict):
                lines.append(f"| {row['items']:,} | **merged**, {label.replace('concurrency_', '')} in flight "
                             f"({f['mean_candidates']:.0f} candidates; skipped {f['skipped'] or 'none'}) | "
                             f"{_f(f['p50_ms'], 2)} | {_f(f['p99_ms'], 2)} |")
    lines += ["", "| items | ANN recall vs exact | build: insert rows/s, index s, load s | Milvus RSS released -> loaded "
              "| raw vectors MB |", "|---|---|---|---|---|"]
    for row in r["sizes"]:
        b, m = row["build"], row.get("milvus_rss_mb") or {}
        recall = ", ".join(f"{k} {v}" for k, v in row["ann_recall"].items() if k.startswith("@"))
        first = b if b.get("built_now") else b.get("earlier_build")
        build = ("reused (built before build figures were kept)" if not first else
                 f"{_f(first.get('insert_rows_per_s'))}, "
                 f"{_f(first.get('index_build_s', 0.0) + first.get('index_wait_s', 0.0))} "
                 f"(+{_f(first.get('compaction_wait_s'))} compaction), {_f(b.get('load_s'))}"
                 + ("" if b.get("built_now") else f" (built {first.get('date')}, load {first.get('load_average_1_5_15')})"))
        lines.append(f"| {row['items']:,} | {recall} | {build} | {m.get('released', '-')} -> {m.get('loaded', '-')} MB "
                     f"(+{m.get('delta', '-')}) | {row['raw_vectors_mb']} |")
    if "training" in r:
        t = r["training"]
        lines += ["", f"Two-tower training on MovieLens-100K ({t['split']}, CPU): **{t['train_seconds']} s**; "
                      f"candidate recall@500 merged {t['metrics']['recall@500_merged']} "
                      f"(every {r.get('stride', '?')}th held-out event)."]
    return lines


def _generic(r: dict[str, Any]) -> list[str]:
    from bench.plots import numeric_leaves

    leaves = numeric_leaves(r)[:25]
    if not leaves:
        return ["(no numeric figures found; see the JSON)"]
    return ["| figure | value |", "|---|---|", *[f"| {k} | {_f(v)} |" for k, v in leaves]]


def _ab(r: dict[str, Any]) -> list[str]:
    lines = [f"{r['path']} path, {r['items']:,} items, {r['connections']} connection(s); medians of "
             f"{len(r['rounds']['old'])} alternating {r['seconds_per_round']} s runs per revision.", "",
             "| | revision | p50 ms | p99 ms | API CPU ms/req | Milvus CPU ms/req | requests |", "|---|---|---|---|---|---|---|"]
    for name, row in r["summary"].items():
        lines.append(f"| {name} | {row['revision']} | {_f(row['p50_ms'], 1)} | {_f(row['p99_ms'], 1)} | "
                     f"{_f(row['api_cpu_ms_per_request'], 2)} | {_f(row['milvus_cpu_ms_per_request'], 2)} | "
                     f"{row['requests']:,} |")
    return lines


SECTIONS = {"quality": _quality, "offline": _offline, "latency": _latency, "ingest": _ingest,
            "retrieval": _retrieval, "ab": _ab}


def write_summary(statuses: dict[str, tuple[str, float]] | None = None,
                  timeline: dict[str, Any] | None = None) -> Path:
    """bench/results/README.md from every results/*.json (and this run's statuses and timeline)."""
    names = [n for n in ORDER if (RESULTS / f"{n}.json").exists()]
    names += sorted(p.stem for p in RESULTS.glob("*.json") if p.stem not in names)
    lines = ["# Benchmark results", "",
             "Generated by `python -m bench` (`make bench`) from the JSON files in this folder; do not edit by hand.",
             "Each figure was measured on the machine, date and commit its row names. Absolute times on these",
             "shared 2-core machines drift: HTTP figures are compared with a FastAPI hello-world measured in the",
             "same run; the load average (1/5/15 min) during a run is recorded where the benchmark saves it.", "",
             "| result | what | date (UTC) | commit | machine | load | plot |", "|---|---|---|---|---|---|---|"]
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        r = json.loads((RESULTS / f"{name}.json").read_text())
        results[name] = r
        m = r.get("machine", {})
        plot = f"[{name}.png]({name}.png)" if (RESULTS / f"{name}.png").exists() else "-"
        what = WHAT.get(name) or (f"{WHAT[name.split('_', 1)[0]]}; side run" if name.split("_", 1)[0] in WHAT else "")
        lines.append(f"| [{name}]({name}.json) | {what} | {m.get('date', '?')} | {m.get('commit', '?')} "
                     f"| {m.get('cpus', '?')} CPUs, {m.get('platform', '?')}, Python {m.get('python', '?')} "
                     f"| {r.get('load_average_1_5_15', '-')} | {plot} |")
    last_run = RESULTS / "last_run.txt"  # JSON, but not a result: kept out of the *.json glob
    if statuses:
        last_run.write_text(json.dumps({"finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                        "statuses": statuses, "timeline": timeline or {}}))
    elif last_run.exists():
        saved = json.loads(last_run.read_text())
        statuses = {n: (s, t) for n, (s, t) in saved["statuses"].items()}
        timeline = saved.get("timeline") or {}
    missing = [n for n in ORDER if n not in results]
    if missing:
        lines += ["", f"No result yet: {', '.join(missing)}."]
    if statuses:
        timeline = timeline or {}
        total = timeline.get("wall_s") or sum(t for _, t in statuses.values())
        prebuild = timeline.get("synthetic_prebuild")

        def load(n: str) -> str:
            return f" (load at its end {timeline[n]['load_average_1_5_15']})" if n in timeline else ""

        lines += ["", f"Last `python -m bench` run ({total / 60:.1f} min in all):", "",
                  *[f"- {n}: {status}{f' in {secs:.0f} s' if secs else ''}{load(n)}"
                    for n, (status, secs) in statuses.items()]]
        if prebuild:
            lines.append(f"- synthetic catalogues (built beside offline): ready {prebuild['seconds']:.0f} s after the start")
    for name, r in results.items():
        lines += ["", f"## {name}", ""]
        try:
            section = SECTIONS.get(name) or SECTIONS.get(name.split("_", 1)[0], _generic)
            lines += section(r)
        except (KeyError, TypeError) as exc:
            lines += [f"(could not summarise: missing {exc}; see {name}.json)"]
        if (RESULTS / f"{name}.png").exists():
            lines += ["", f"![{name}]({name}.png)"]
    path = RESULTS / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", nargs="?", default="all", choices=[*ORDER, "all", "summary"])
    args = parser.parse_args(argv)
    if extra and args.benchmark in ("all", "summary"):
        parser.error("arguments after -- go to one named benchmark")
    names = ORDER if args.benchmark == "all" else [] if args.benchmark == "summary" else [args.benchmark]
    statuses: dict[str, tuple[str, float]] = {}
    timeline: dict[str, Any] = {}  # per benchmark: start offset, seconds, load average at its end
    started = time.perf_counter()
    previous = last_run_seconds()
    prebuild = SyntheticPrebuild().start() if args.benchmark == "all" else None
    with tqdm(total=len(names), desc="benchmarks", unit="bench", position=0, leave=True) as bar:
        for i, name in enumerate(names):
            bar.set_postfix_str(name)
            tqdm.write(f"== {name}: {WHAT.get(name, '')}")
            if prebuild is not None and name not in BESIDE_PREBUILD:
                prebuild.wait()
            phase_started = time.perf_counter()
            statuses[name] = run_one(name, extra)
            timeline[name] = {"started_s": round(phase_started - started, 1), "seconds": round(statuses[name][1], 1),
                              "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()]}
            left = sum(previous.get(n, 0.0) for n in names[i + 1:])
            tqdm.write(f"== {name}: {statuses[name][0]} ({statuses[name][1]:.0f} s, load {os.getloadavg()[0]:.1f}); "
                       f"{(time.perf_counter() - started) / 60:.1f} min so far"
                       + (f", ~{left / 60:.0f} min left by the last run's times" if left else ""))
            bar.update(1)
    if prebuild is not None:
        prebuild.wait()
        tqdm.write(f"== synthetic catalogues ready {prebuild.seconds:.0f} s after the start (built beside offline)")
        timeline["synthetic_prebuild"] = {"started_s": 0.0, "seconds": round(prebuild.seconds or 0.0, 1)}
        release_synthetic()
    from bench.plots import plot

    for name in ORDER:
        try:
            plot(name)
        except Exception as exc:  # noqa: BLE001 (a plot must not lose the numbers)
            print(f"plot {name} failed: {exc!r}", file=sys.stderr)
    if args.benchmark == "all":
        timeline["wall_s"] = round(time.perf_counter() - started, 1)
    path = write_summary(statuses if args.benchmark == "all" else None, timeline)
    print(f"summary: {path}")
    if names:
        print(f"total {time.perf_counter() - started:.0f} s: " + ", ".join(f"{n} {s}" for n, (s, _) in statuses.items()))
    return 0 if all(s == "ok" or s.startswith("missing") for s, _ in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
