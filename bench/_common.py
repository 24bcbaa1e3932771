"""Shared benchmark plumbing: start servers, drive them with wrk, save results with the machine.

Absolute times on shared 2-core machines drift, so every HTTP benchmark also
measures a FastAPI hello-world in the same run (the ceiling) and reports ratios.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"

# wrk's done() hook prints exact percentiles (microseconds) and counts as JSON.
_DONE_LUA = """
done = function(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout
  io.write(string.format('WRKJSON {"requests": %d, "duration_us": %d, "non2xx": %d, "errors": %d, '
    .. '"p50_us": %d, "p90_us": %d, "p99_us": %d, "p999_us": %d, "max_us": %d, "mean_us": %.1f}\\n',
    summary.requests, summary.duration, summary.errors.status, errors,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.max, latency.mean))
end
"""


def machine() -> dict[str, Any]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": commit or None,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def save(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **result}, indent=2) + "\n")
    print(f"saved {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return path


def require_wrk() -> str:
    wrk = shutil.which("wrk")
    if wrk is None:
        sys.exit("wrk is needed for HTTP benchmarks: apt-get install -y wrk")
    return wrk


def wrk(url: str, *, seconds: int = 10, connections: int = 32, threads: int = 1, method: str = "GET",
        body: bytes | None = None, headers: dict[str, str] | None = None,
        paths: list[str] | None = None, server_pid: int | None = None) -> dict[str, Any]:
    """Run wrk against url; returns requests/s, percentiles in ms, non-2xx and socket errors.

    ``paths``: request these in turn (round robin per wrk thread) instead of url's own path.
    ``server_pid``: also the CPU that process used during the run, per request
    (``server_cpu_ms_per_request``) and in cores (``server_cores``; below 1 for a one-worker
    server that was saturated means it waited, e.g. for CPU other processes held).
    """
    headers = {**(headers or {})}
    script = [f'wrk.method = "{method}"']
    if body is not None:
        headers.setdefault("Content-Type", "application/json")
    for key, value in headers.items():
        script.append(f'wrk.headers["{key}"] = "{value}"')
    if paths:
        script.append("local paths = {" + ",".join(json.dumps(p) for p in paths) + "}")
        script.append("local i = 0\nrequest = function()\n  i = i % #paths + 1\n  return wrk.format(nil, paths[i])\nend")
    with tempfile.TemporaryDirectory() as tmp:
        if body is not None:
            body_path = Path(tmp) / "body.json"
            body_path.write_bytes(body)
            script.append(f'local f = io.open("{body_path}", "rb"); wrk.body = f:read("*all"); f:close()')
        lua = Path(tmp) / "bench.lua"
        lua.write_text("\n".join(script) + "\n" + _DONE_LUA)
        cpu_before = cpu_seconds(server_pid) if server_pid else None
        out = subprocess.run(
            [require_wrk(), f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "-s", str(lua), url],
            capture_output=True, text=True, check=True,
        ).stdout
    line = next(row for row in out.splitlines() if row.startswith("WRKJSON "))
    raw = json.loads(line.removeprefix("WRKJSON "))
    secs = raw["duration_us"] / 1e6
    cpu = {}
    if server_pid and cpu_before is not None:
        used = cpu_seconds(server_pid) - cpu_before
        cpu = {"server_cpu_ms_per_request": round(used * 1000 / max(raw["requests"], 1), 4),
               "server_cores": round(used / secs, 3)}
    return {
        **cpu,
        "requests": raw["requests"],
        "rps": round(raw["requests"] / secs, 1),
        "p50_ms": raw["p50_us"] / 1000, "p90_ms": raw["p90_us"] / 1000, "p99_ms": raw["p99_us"] / 1000,
        "p999_ms": raw["p999_us"] / 1000, "max_ms": raw["max_us"] / 1000,
        "non2xx": raw["non2xx"], "socket_errors": raw["errors"], "connections": connections, "seconds": seconds,
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def uvicorn_server(app: str, port: int, env: dict[str, str] | None = None, factory: bool = True,
                   cwd: str | Path | None = None):
    """One uvicorn worker (uvloop, no access log) on 127.0.0.1:port for the duration of the block
    (``cwd``: the checkout whose code it runs; default this one)."""
    argv = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port),
            "--no-access-log", "--loop", "uvloop", "--log-level", "warning"]
    if factory:
        argv.append("--factory")
    process = subprocess.Popen(argv, env={**os.environ, **(env or {})}, cwd=cwd)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                    break
            except OSError:
                if process.poll() is not None:
                    raise RuntimeError(f"{app} exited with {process.returncode}") from None
                time.sleep(0.2)
        yield process
    finally:
        process.terminate()
        process.wait(timeout=10)


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")
