"""Load shedding: under overload refuse low-priority requests first, keep the homepage fast.

In: every HTTP request (its route and, for recommendations, its ``surface``).
Out: either the request passes through, or an immediate 503 ``overloaded``
with Retry-After, counted in ``recsys_requests_shed_total{surface}``.

The signal is the number of requests this process is handling at once. A
single event loop serves them in turn, so once more are inside than it can
finish within the latency budget, each newcomer only adds queueing delay for
all the others. Each class may use a share of ``security.shed_max_in_flight``
(homepage 100 %, related 50 %, ...): as load grows, related and up-next
requests are refused first, and the homepage keeps the capacity. Refusing
costs microseconds (no auth, no body read), which is what makes it work.
"""

from __future__ import annotations

from urllib.parse import unquote_plus

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.errors import error_body
from serving.metrics import REQUESTS_SHED

NEVER_SHED = frozenset({"/healthz", "/readyz", "/metrics"})


def request_class(scope: Scope) -> str:
    """homepage | up_next | related (recommendations by surface), ingest, or other."""
    path: str = scope.get("path", "")
    if path.startswith("/recommendations"):
        # The first surface parameter, as parse_qs would read it, without parsing the rest.
        # POST bodies are not read here (that would cost what shedding saves): homepage.
        for part in scope.get("query_string", b"").split(b"&"):
            if part.startswith(b"surface=") and len(part) > 8:
                return unquote_plus(part[8:].decode("latin-1"))
        return "homepage"
    if path.startswith("/interactions"):
        return "ingest"
    return "other"


class LoadShedder:
    """Pure ASGI middleware; one instance per app (the in-flight count is per process)."""

    def __init__(self, app: ASGIApp, max_in_flight: int, shares: dict[str, float]) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.limits = {name: max(1, int(max_in_flight * share)) for name, share in shares.items()}
        self.default_limit = self.limits.get("other", max_in_flight)
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.max_in_flight <= 0 or scope.get("path") in NEVER_SHED:
            await self.app(scope, receive, send)
            return
        klass = request_class(scope)
        if klass not in self.limits:  # an unknown surface must not mint a new metric label
            klass = "other"
        if self.in_flight >= self.limits.get(klass, self.default_limit):
            REQUESTS_SHED.labels(surface=klass).inc()
            await _refuse(scope, receive, send, klass)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


async def _refuse(scope: Scope, receive: Receive, send: Send, klass: str) -> None:
    response = JSONResponse(
        error_body("overloaded", f"the service is overloaded; {klass} requests are refused first, retry shortly"),
        status_code=503, headers={"Retry-After": "1"},
    )
    await response(scope, receive, send)
