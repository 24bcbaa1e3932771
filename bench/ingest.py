"""POST /interactions throughput and latency on ONE uvicorn worker, singles and batches of 100.

    python -m bench.ingest [--seconds 10]

Needs the embedded stack's broker (`make up`). Events go to ``bench.``-prefixed
topics so the flows and the demo data never see them. A FastAPI hello-world is
measured in the same run as the ceiling. Saves bench/results/ingest.json.
"""

from __future__ import annotations

import argparse
import sys
import uuid

import orjson

from bench._common import save, uvicorn_server, wrk
from infra.kafka import ensure_topics
from infra.stack import port_open, settings_env, split_host_port
from serving.config import load_settings
from tests.conftest import free_port


def event(i: int) -> dict[str, object]:
    return {"user_id": f"bench-u{i % 1000}", "item_id": f"bench-i{i % 5000}", "interaction_type": "click",
            "surface": "homepage", "device": "web", "timestamp": "2024-05-01T12:00:00Z"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args(argv)
    settings = load_settings()
    if not port_open(*split_host_port(settings.kafka.bootstrap_servers)):
        sys.exit(f"no broker at {settings.kafka.bootstrap_servers}: start the stack with `make up` first")
    settings.kafka.topic_prefix = "bench."
    ensure_topics(settings)
    headers = auth_headers(settings)

    results: dict[str, object] = {}
    hello_port, api_port = free_port(), free_port()
    with uvicorn_server("bench.hello:create_app", hello_port):
        results["hello_world"] = wrk(f"http://127.0.0.1:{hello_port}/hello", seconds=args.seconds, connections=32)
    env = settings_env(settings)
    with uvicorn_server("serving.app:create_app", api_port, env=env):
        base = f"http://127.0.0.1:{api_port}"
        single = orjson.dumps(event(1))
        results["single"] = wrk(f"{base}/interactions", seconds=args.seconds, connections=32, method="POST",
                                body=single, headers=headers)
        batch = orjson.dumps({"events": [event(i) for i in range(100)]})
        results["batch_100"] = wrk(f"{base}/interactions/batch", seconds=args.seconds, connections=8, method="POST",
                                   body=batch, headers=headers)
    results["batch_100"]["events_per_s"] = round(results["batch_100"]["rps"] * 100, 1)  # type: ignore[index]
    results["single"]["ratio_to_hello_world"] = round(  # type: ignore[index]
        results["single"]["rps"] / results["hello_world"]["rps"], 3)  # type: ignore[index]

    print(f"{'case':12} {'req/s':>9} {'events/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'non2xx':>6}")
    for name in ("hello_world", "single", "batch_100"):
        r = results[name]  # type: ignore[assignment]
        per_req = 100 if name == "batch_100" else 1
        print(f"{name:12} {r['rps']:9.0f} {r['rps'] * per_req:9.0f} {r['p50_ms']:7.2f} {r['p99_ms']:7.2f} {r['non2xx']:6}")  # type: ignore[index]
    save("ingest", {"note": "one uvicorn worker; 202 is sent after the broker's ack (acks=all)", **results})
    return 0


def auth_headers(settings) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """A fresh key with events:write (the API requires one)."""
    from infra.apikeys import create_key

    # A benchmark key must not be throttled by its own rate limit.
    key, _ = create_key(settings, name=f"bench-{uuid.uuid4().hex[:6]}", scopes=["events:write"],
                        rate_per_s=1e6, burst=10**7)
    return {"X-API-Key": key}


if __name__ == "__main__":
    sys.exit(main())
