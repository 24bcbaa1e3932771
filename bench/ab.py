"""A/B of GET /recommendations between two revisions, measured side by side (what a speed claim needs here).

    python -m bench.ab --old d58dbc1 [--new HEAD] [--path live|cached] [--size 100000]
                       [--rounds 8] [--seconds 10] [--connections 1]

In: the embedded stack's broker, Redis and Milvus (`make up`) and the latency
benchmark's synthetic catalogue, users and model (bench/latency.py builds
what is missing). Out: bench/results/ab.json and a printed table: per
revision, the median over rounds of p50 and p99, and the CPU per request of
the API process and of the Milvus server.

Why: this machine's speed drifts by ±30% from minute to minute, so two
benchmark runs minutes apart compare the minutes as much as the code (the
same revision measured 16 and 23 ms of API CPU per live request 4 minutes
apart). Here both revisions run at once, each an API process on its own
checkout (``git worktree``, sharing this checkout's ``.recsys`` state), and
short wrk runs alternate between them (ABBA order), so every stretch of
drift is shared. ``--new`` defaults to this checkout as it is, uncommitted
changes included.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from bench._common import cpu_seconds, save, uvicorn_server, wrk
from bench.latency import LIVE_ENV, find_pid, prepare_size, user_paths, warm

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def checkout(rev: str):
    """A detached worktree of ``rev`` that shares this checkout's state folder; removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="ab-") as tmp:
        path = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(path), rev], check=True)
        try:
            (path / ".recsys").symlink_to(ROOT / ".recsys")
            yield path
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], check=False)


def this_checkout() -> str:
    """HEAD's short hash, marked where the checkout has uncommitted changes (they are measured too)."""
    return subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty= + changes"],
                          capture_output=True, text=True).stdout.strip()


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    def median(key: str) -> float:
        return round(statistics.median(r[key] for r in rounds), 2)

    return {"p50_ms": median("p50_ms"), "p99_ms": median("p99_ms"), "rps": median("rps"),
            "api_cpu_ms_per_request": median("server_cpu_ms_per_request"),
            "milvus_cpu_ms_per_request": median("milvus_cpu_ms_per_request"),
            "p99_ms_each_round": [r["p99_ms"] for r in rounds], "requests": sum(r["requests"] for r in rounds)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", required=True, help="git revision measured as the baseline")
    parser.add_argument("--new", help="git revision measured against it (default: this checkout as it is)")
    parser.add_argument("--path", choices=("live", "cached"), default="live")
    parser.add_argument("--size", type=int, default=100_000, help="synthetic catalogue size (items)")
    parser.add_argument("--rounds", type=int, default=8, help="runs per revision, alternating")
    parser.add_argument("--seconds", type=int, default=10, help="length of each run")
    parser.add_argument("--connections", type=int, default=1)
    args = parser.parse_args(argv)
    from tests.conftest import free_port

    setup, headers, env = prepare_size(args.size)
    paths = user_paths()
    milvus = find_pid("milvus run standalone")
    if milvus is None:
        sys.exit("no Milvus server process: start the stack with `make up` first")
    extra = LIVE_ENV if args.path == "live" else {}
    names = {"old": args.old, "new": args.new or this_checkout()}
    with ExitStack() as stack:
        trees = {"old": stack.enter_context(checkout(args.old)),
                 "new": stack.enter_context(checkout(args.new)) if args.new else ROOT}
        servers = {}
        for name, tree in trees.items():
            port = free_port()
            process = stack.enter_context(uvicorn_server("serving.app:create_app", port, env={**env, **extra}, cwd=tree))
            servers[name] = (f"http://127.0.0.1:{port}", process.pid)
            warm(servers[name][0], paths, headers, cached=args.path == "cached")
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
        for n in range(args.rounds):
            for name in (("old", "new") if n % 2 == 0 else ("new", "old")):
                base, pid = servers[name]
                before = cpu_seconds(milvus)
                run = wrk(base, seconds=args.seconds, connections=args.connections, headers=headers, paths=paths,
                          server_pid=pid)
                run["milvus_cpu_ms_per_request"] = round((cpu_seconds(milvus) - before) * 1000
                                                         / max(run["requests"], 1), 3)
                rounds[name].append(run)
                print(f"round {n} {name:3} p50 {run['p50_ms']:6.1f} p99 {run['p99_ms']:6.1f} ms  API CPU "
                      f"{run['server_cpu_ms_per_request']:6.2f} ms/req  Milvus CPU {run['milvus_cpu_ms_per_request']:6.2f}",
                      flush=True)
    summary = {name: {"revision": names[name], **summarise(rs)} for name, rs in rounds.items()}
    print(f"{'':4} {'revision':16} {'p50 ms':>7} {'p99 ms':>7} {'API CPU':>8} {'Milvus CPU':>10}  (medians of rounds)")
    for name, row in summary.items():
        print(f"{name:4} {row['revision'][:16]:16} {row['p50_ms']:7.1f} {row['p99_ms']:7.1f} "
              f"{row['api_cpu_ms_per_request']:8.2f} {row['milvus_cpu_ms_per_request']:10.2f}")
    save("ab", {"path": args.path, "items": args.size, "connections": args.connections,
                "seconds_per_round": args.seconds, "summary": summary, "rounds": rounds, "setup": setup})
    return 0


if __name__ == "__main__":
    sys.exit(main())
