"""Prometheus metrics: every metric object of the service, named here, exposed on GET /metrics.

In: observations from the HTTP middleware (serving/logging.py), the auth
dependency, the publisher, the pipeline and the flows. Out: the Prometheus
text format on ``/metrics`` (open, like /healthz: protect it at the network
edge) and, for flow processes, on their own port (:func:`serve_metrics`).

Add a measurement by importing the object, never by creating metrics
elsewhere (a second registration of a name raises):

    from serving.metrics import PIPELINE_STAGE_SECONDS, CACHE_LOOKUPS, FALLBACKS
    with PIPELINE_STAGE_SECONDS.labels(stage="ann", surface=surface).time(): ...
    CACHE_LOOKUPS.labels(cache="recs", result="hit").inc()
    FALLBACKS.labels(reason="milvus_down").inc()

Label values must come from small fixed sets (route templates, stage names,
surfaces), never from ids: every distinct value is a new time series.
With several uvicorn workers set PROMETHEUS_MULTIPROC_DIR (an empty folder,
cleared at start): every worker then writes its samples there and /metrics
sums them, so one scrape sees the whole replica.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import time
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    start_http_server,
)


@functools.cache
def child(metric: Any, *label_values: str) -> Any:
    """``metric.labels(*label_values)``, looked up once per label set (it costs microseconds per call).

    Bounded like the metric itself: label values come from small fixed sets.
    """
    return metric.labels(*label_values)


# Fine buckets below 100 ms: the serving budget lives there (homepage p99 target).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1,
                   0.15, 0.25, 0.5, 1.0, 2.5, 5.0)

# --- HTTP -------------------------------------------------------------------------
HTTP_REQUEST_SECONDS = Histogram(
    "recsys_http_request_duration_seconds",
    "Time from request received to response sent, by route template.",
    ["method", "route"],
    buckets=LATENCY_BUCKETS,
)
HTTP_REQUESTS = Counter(
    "recsys_http_requests_total",
    "Requests answered, by route template and status code.",
    ["method", "route", "status"],
)
HTTP_IN_FLIGHT = Gauge(
    "recsys_http_requests_in_flight", "Requests being handled now.", multiprocess_mode="livesum"
)

# --- security ---------------------------------------------------------------------
AUTH_FAILURES = Counter(
    "recsys_auth_failures_total",
    "Requests refused by authentication, authorisation or rate limiting.",
    ["reason"],  # missing | unknown | forbidden | rate_limited
)
AUTH_STORE_ERRORS = Counter(
    "recsys_auth_store_errors_total",
    "API key checks that could not reach Redis (served from cache or answered 503).",
)

# --- event log --------------------------------------------------------------------
PRODUCE_ERRORS = Counter(
    "recsys_produce_errors_total",
    "Records the broker did not acknowledge (the client got 503 and nothing was accepted).",
    ["topic"],
)
DEAD_LETTERS = Counter(
    "recsys_dead_letters_total",
    "Records routed to the dead-letter topic, by where they were rejected.",
    ["source"],  # api | flow name
)

# --- recommendation pipeline (set by serving/pipeline and the routes) ---------------
PIPELINE_STAGE_SECONDS = Histogram(
    "recsys_pipeline_stage_duration_seconds",
    "Time spent in one stage of the live pipeline.",
    ["stage", "surface"],  # stage: candidates_<source> | light_rank | heavy_rank | policy | ...
    buckets=LATENCY_BUCKETS,
)
CACHE_LOOKUPS = Counter(
    "recsys_cache_lookups_total",
    "Cache lookups by cache and result; hit ratio = hit / (hit + miss + stale).",
    ["cache", "result"],  # result: hit | miss | stale
)
FALLBACKS = Counter(
    "recsys_fallbacks_total",
    "Answers served from a fallback, by reason (a dependency down, a timeout, ...).",
    ["reason"],
)
ANN_REPLIES_CUT = Counter(
    "recsys_ann_replies_cut_total",
    "Milvus search replies that looked cut short (0-1 hit, or under half of their call's longest) and were"
    " checked with an unfiltered search, by whether the check found more (infra/milvus.py).",
    ["repaired"],  # true | false (the filter passes that few)
)
RECOMMENDATIONS_SERVED = Counter(
    "recsys_recommendations_served_total",
    "Recommendation lists served, by surface and where they came from.",
    ["surface", "served_from"],
)
REQUESTS_SHED = Counter(
    "recsys_requests_shed_total",
    "Requests refused under overload, by surface (low-priority surfaces first).",
    ["surface"],
)

# --- the process ------------------------------------------------------------------
GC_PAUSE_SECONDS = Histogram(
    "recsys_gc_pause_seconds",
    "Pauses of CPython's cycle collector (the whole process waits), by generation: full (2) ones grow"
    " with the long-lived objects a process keeps, and show up directly in the request p99.",
    ["generation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
)

# --- streaming freshness (set by the flows or a lag monitor) -----------------------
FLOW_LAG_SECONDS = Gauge(
    "recsys_flow_lag_seconds",
    "Now minus the event time of the last record a flow processed (not the broker watermark).",
    ["flow"],
    multiprocess_mode="mostrecent",
)
FLOW_LAG_RECORDS = Gauge(
    "recsys_flow_lag_records",
    "Records produced (counted by the producer side) but not yet processed by a flow.",
    ["flow"],
    multiprocess_mode="mostrecent",
)
FRESHNESS_SECONDS = Gauge(
    "recsys_feature_freshness_seconds",
    "Age of the newest event reflected in a derived state (features, cache, vectors).",
    ["state"],
    multiprocess_mode="mostrecent",
)
FLOW_DEAD_LETTERS = Gauge(
    "recsys_flow_dead_letters",
    "Records a flow sent to the dead-letter topic since the start of the log (its recoverable count).",
    ["flow"],
    multiprocess_mode="mostrecent",
)

# --- live quality (from the impression and interaction logs) ------------------------
QUALITY_CTR = Gauge(
    "recsys_quality_ctr", "Click-through rate over the last window.", ["surface"],
    multiprocess_mode="mostrecent",
)
QUALITY_COVERAGE = Gauge(
    "recsys_quality_catalog_coverage", "Share of the active catalogue shown over the last window.",
    multiprocess_mode="mostrecent",
)
QUALITY_DIVERSITY = Gauge(
    "recsys_quality_intra_list_diversity", "Mean intra-list diversity of served lists.", ["surface"],
    multiprocess_mode="mostrecent",
)
QUALITY_EXPOSURE_GINI = Gauge(
    "recsys_quality_exposure_gini", "Gini coefficient of item exposure (1 = all on one item).",
    multiprocess_mode="mostrecent",
)

# Decided once, at import: importing feast later sets PROMETHEUS_MULTIPROC_DIR in
# os.environ for its own use, which must not switch this process's /metrics to
# reading files its in-memory counters were never written to.
_MULTIPROC_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR")

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Every metric in the Prometheus text format (summed over workers in multiprocess mode)."""
    from serving.lag import refresh_flow_gauges

    try:
        # Flow lag and freshness are read from both ends' progress notes at scrape time.
        async with asyncio.timeout(1.0):
            await refresh_flow_gauges(request.app.state.settings, request.app.state.redis)
    except Exception as exc:  # noqa: BLE001 (the other metrics must still be served)
        log.warning("flow_gauges_unavailable error=%r", exc)
    registry = REGISTRY
    if _MULTIPROC_DIR:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def track_gc_pauses() -> None:
    """Observe every collection's pause in GC_PAUSE_SECONDS (idempotent; ~1 us per collection)."""
    if _observe_gc in gc.callbacks:
        return
    gc.callbacks.append(_observe_gc)


_gc_started = [0.0]


def _observe_gc(phase: str, info: dict[str, int]) -> None:
    # Collections never overlap (the collector holds the GIL): one start time is enough.
    if phase == "start":
        _gc_started[0] = time.perf_counter()
    else:
        child(GC_PAUSE_SECONDS, str(info["generation"])).observe(time.perf_counter() - _gc_started[0])


def serve_metrics(port: int, addr: str = "127.0.0.1") -> None:
    """Expose this process's metrics on ``addr:port`` (for flow processes without an HTTP app)."""
    start_http_server(port, addr=addr)
