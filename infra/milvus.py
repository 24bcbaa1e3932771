"""Item vectors in Milvus: one collection per model version, served through one alias.

In: item records and their vectors (from the item tower). Out: collections
``<collection_prefix>_<version>`` with the vector and the scalar fields
filtered ANN needs (category, language, regions, status, published_at,
maturity_rating, cold), and the serving alias pointing at the live one.
The alias moves with one ``alter_alias`` call, so a search sees either the
old collection or the new one, never neither; the old one is dropped only
after the swap.

pymilvus 3 pitfalls (DESIGN.md): index params are nested
(``params={"params": {...}}``) or silently dropped; a hit's key may be the
primary-key field name or "id"; after a restart searches fail until the
collection is loaded again.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import compress
from typing import Any

import numpy as np
from pymilvus import DataType, MilvusClient

from schemas.catalog import ItemRecord, ItemStatus
from serving.config import Settings
from serving.logging import route_library_loggers
from serving.metrics import ANN_REPLIES_CUT
from serving.metrics import child as metric_child

# Importing pymilvus just installed its own log handlers; where logging was configured first, undo that.
route_library_loggers()

log = logging.getLogger(__name__)


class _DropDeadlineErrors(logging.Filter):
    """pymilvus logs every failed RPC at ERROR with a traceback. A search cut at its deadline is
    routine under load (the candidate source is skipped and logged once, by serving.candidates),
    so those records, and only those, are dropped. In every process that imports this module
    (flows and the model worker too, which leave pymilvus' logging as it is)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "DEADLINE_EXCEEDED" not in record.getMessage()


logging.getLogger("pymilvus.decorators").addFilter(_DropDeadlineErrors())

try:  # the pieces of pymilvus the lean search uses (MilvusItemIndex._search_lean)
    from pymilvus.client.prepare import Prepare
    from pymilvus.client.ts_utils import construct_guarantee_ts
    from pymilvus.client.utils import check_status

    _LEAN_SEARCH = hasattr(MilvusClient, "_get_connection")
except ImportError:  # another pymilvus: the public call
    _LEAN_SEARCH = False

# search_unfiltered searches first this many times deeper than it answers (the region alone passes
# ~56% of the benchmark catalogue), at most the second; Milvus' largest topk.
UNFILTERED_DEPTH = (4, 16)
MAX_TOPK = 16384
# How long search_each trusts a filter's counted size (new items may pass it after that).
FILTER_SIZE_TTL_S = 60.0

# One query's answer from a search request: ids, scores, and the asked-for scalar columns.
Reply = tuple[Sequence[Any], Sequence[float], dict[str, Sequence[Any]]]

PK = "item_id"
VECTOR = "embedding"
SCALARS = ("category", "language", "regions", "status", "published_at", "maturity_rating", "cold")


def collection_name(settings: Settings, version: str) -> str:
    return f"{settings.retrieval.collection_prefix}_{version}"


def connect(settings: Settings) -> MilvusClient:
    return MilvusClient(uri=settings.milvus.uri, timeout=settings.milvus.timeout_s)


def vector_index_params(settings: Settings) -> dict:
    """The vector index every item collection gets: {"index_type": ..., "params": {...}} (build parameters)."""
    r = settings.retrieval
    return {"index_type": "HNSW", "params": {"M": r.hnsw_m, "efConstruction": r.hnsw_ef_construction}}


def create_item_collection(client: MilvusClient, name: str, dim: int, settings: Settings, load: bool = True,
                           vector_index: bool = True) -> None:
    """Create (if missing) a version's collection with its vector and scalar indexes, loaded unless load=False.

    ``vector_index=False`` (bulk loads): no vector index yet, so sealed segments are not indexed
    one by one while rows still arrive; call ``create_vector_index`` after the flush (then load).
    """
    if not client.has_collection(name):
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(PK, DataType.VARCHAR, is_primary=True, max_length=128)
        schema.add_field(VECTOR, DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field("category", DataType.VARCHAR, max_length=64)
        schema.add_field("language", DataType.VARCHAR, max_length=64)
        # Empty list = shown everywhere (ItemRecord.regions = null).
        schema.add_field("regions", DataType.ARRAY, element_type=DataType.VARCHAR, max_capacity=256,
                         max_length=64)
        schema.add_field("status", DataType.VARCHAR, max_length=16)
        schema.add_field("published_at", DataType.INT64)  # epoch seconds, 0 = unknown
        schema.add_field("maturity_rating", DataType.VARCHAR, max_length=8)
        # The model never saw this item in the log: its vector is content-only (fresh pool).
        schema.add_field("cold", DataType.BOOL)
        index = client.prepare_index_params()
        if vector_index:
            spec = vector_index_params(settings)
            index.add_index(field_name=VECTOR, index_type=spec["index_type"], metric_type="IP",
                            params={"params": spec["params"]})
        # Trie/sort indexes: filtered searches 42 -> 16 ms p50 at 1M items (DESIGN.md).
        index.add_index(field_name="category", index_type="Trie")
        index.add_index(field_name="published_at", index_type="STL_SORT")
        if vector_index:
            client.create_collection(name, schema=schema, index_params=index)  # (pymilvus loads it too)
        else:
            # With index_params, create_collection also loads, which fails without a vector index.
            client.create_collection(name, schema=schema)
            client.create_index(name, index)
    if load:
        client.load_collection(name)


def create_vector_index(client: MilvusClient, name: str, settings: Settings) -> None:
    """Add the vector index (vector_index_params) to a collection created with vector_index=False."""
    index = client.prepare_index_params()
    spec = vector_index_params(settings)
    index.add_index(field_name=VECTOR, index_type=spec["index_type"], metric_type="IP", params={"params": spec["params"]})
    client.create_index(name, index)


def item_rows(items: Sequence[ItemRecord], vectors: np.ndarray, cold: Sequence[bool]) -> list[dict]:
    return rows_from_columns(
        [item.item_id for item in items], vectors,
        category=[item.category or "" for item in items],
        language=[item.language or "" for item in items],
        regions=[list(item.regions or []) for item in items],
        status=[str(item.status) for item in items],
        published_at=[int(item.published_at.timestamp()) if item.published_at else 0 for item in items],
        maturity_rating=[str(item.maturity_rating) if item.maturity_rating else "" for item in items],
        cold=cold,
    )


def rows_from_columns(item_ids: Sequence[str], vectors: np.ndarray, *, category: Sequence[str],
                      language: Sequence[str], regions: Sequence[list[str]], status: Sequence[str],
                      published_at: Sequence[int], maturity_rating: Sequence[str], cold: Sequence[bool]) -> list[dict]:
    """Milvus rows from plain columns (no ItemRecord per row: synthetic catalogues of 1M items use this)."""
    # One tolist() for the whole block: per-row ndarray.tolist() costs ~3x more.
    vector_lists = np.asarray(vectors, dtype=np.float32).tolist()
    return [
        {PK: item_id, VECTOR: vector, "category": c, "language": lang, "regions": r, "status": st,
         "published_at": int(p), "maturity_rating": m, "cold": bool(is_cold)}
        for item_id, vector, c, lang, r, st, p, m, is_cold in zip(
            item_ids, vector_lists, category, language, regions, status, published_at, maturity_rating, cold,
            strict=True)
    ]


def upsert_items(client: MilvusClient, collection: str, items: Sequence[ItemRecord], vectors: np.ndarray,
                 cold: Sequence[bool], batch: int = 5000) -> int:
    """Write active items; a deleted or unavailable item is removed instead (leaves retrieval at once)."""
    live = [(i, item) for i, item in enumerate(items) if item.status == ItemStatus.active]
    gone = [item.item_id for item in items if item.status != ItemStatus.active]
    if gone:
        client.delete(collection, ids=gone)
    rows = item_rows([item for _, item in live], vectors[[i for i, _ in live]], [cold[i] for i, _ in live])
    for start in range(0, len(rows), batch):
        client.upsert(collection, rows[start : start + batch])
    return len(rows)


def alias_target(client: MilvusClient, alias: str) -> str | None:
    """The collection an alias points at, or None (listed first: describing a missing one logs an error)."""
    if alias not in client.list_aliases().get("aliases", []):
        return None
    return str(client.describe_alias(alias)["collection_name"])


def swap_alias(client: MilvusClient, alias: str, collection: str) -> str | None:
    """Point the serving alias at ``collection`` atomically; returns the previous target."""
    previous = alias_target(client, alias)
    if previous is None:
        client.create_alias(collection, alias)
    elif previous != collection:
        client.alter_alias(collection, alias)
    log.info("milvus_alias_swapped alias=%s from=%s to=%s", alias, previous, collection)
    return previous


def drop_collection(client: MilvusClient, name: str) -> None:
    if client.has_collection(name):
        client.release_collection(name)
        client.drop_collection(name)


@dataclass(frozen=True)
class SearchFilter:
    """Scalar restrictions of one ANN search; every backend translates the same object."""

    category: str | None = None
    categories: tuple[str, ...] = ()  # any of these (one search for several categories)
    region: str | None = None
    fresh_since: int | None = None  # epoch seconds: published since then, or cold
    exclude: frozenset[str] = frozenset()

    def expression(self) -> str:
        region = self._region_expression()
        return " and ".join(self._category_parts() + ([region] if region else []) + self._fresh_parts())

    def _region_expression(self) -> str:
        if self.region is None:
            return ""
        return f"(array_length(regions) == 0 or array_contains(regions, {_quote(self.region)}))"

    def _category_parts(self) -> list[str]:
        parts = []
        if self.category is not None:
            parts.append(f"category == {_quote(self.category)}")
        if self.categories:
            parts.append(f"category in [{', '.join(_quote(c) for c in self.categories)}]")
        return parts

    def _fresh_parts(self) -> list[str]:
        return [] if self.fresh_since is None else [f"(published_at >= {int(self.fresh_since)} or cold == true)"]

    def shown(self, regions: Any) -> bool:
        """Whether an item with these regions (a list, or a reply's ScalarField) passes the region: none = everywhere."""
        values = regions.string_data.data if hasattr(regions, "string_data") else regions
        return self.region is None or not values or self.region in values

    def fields(self) -> tuple[str, ...]:
        """The scalar fields :meth:`passes` reads, besides the region."""
        return (("category",) if self.category is not None or self.categories else ()) + (
            ("published_at", "cold") if self.fresh_since is not None else ())

    def passes(self, columns: Mapping[str, Sequence[Any]], n: int) -> list[bool]:
        """For n hits with these scalar columns (:meth:`fields`): which pass everything but ``exclude``, and
        but the region unless the columns hold ``regions`` too (a search that did not filter by it)."""
        passed = [True] * n
        if self.region is not None and "regions" in columns:
            passed = [self.shown(r) for r in columns["regions"]]
        if self.category is not None:
            passed = [p and c == self.category for p, c in zip(passed, columns["category"], strict=True)]
        if self.categories:
            wanted = frozenset(self.categories)
            passed = [p and c in wanted for p, c in zip(passed, columns["category"], strict=True)]
        if self.fresh_since is not None:
            since = self.fresh_since
            passed = [p and (bool(cold) or at >= since)
                      for p, cold, at in zip(passed, columns["cold"], columns["published_at"], strict=True)]
        return passed

    @staticmethod
    def either(filters: Sequence[SearchFilter]) -> str | None:
        """One expression passing what any of ``filters`` passes, where they share the region
        (its check is evaluated once); None where they do not."""
        if len({f.region for f in filters}) != 1:
            return None
        branches = [" and ".join(f._category_parts() + f._fresh_parts()) for f in filters]
        region = filters[0]._region_expression()
        if not all(branches):  # one branch passes everything in the region
            return region
        either = " or ".join(f"({b})" for b in branches)
        return f"{region} and ({either})" if region else either


def _scalars(field: Any) -> Sequence[Any]:
    """The values of one scalar column of a search reply (FieldData protobuf)."""
    scalars = field.scalars
    kind = scalars.WhichOneof("data")
    return getattr(scalars, kind).data if kind else ()  # no hits: the column is left unset


def _kept(hits: Iterable[tuple[str, float]], flt: SearchFilter, k: int) -> list[tuple[str, float]]:
    """The first k hits the filter does not exclude."""
    return [h for h in hits if h[0] not in flt.exclude][:k]


def _count_cut(repaired: bool) -> None:
    metric_child(ANN_REPLIES_CUT, "true" if repaired else "false").inc()


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class MilvusItemIndex:
    """Searches the serving alias; reconnects lazily so a Milvus restart heals on its own."""

    name = "milvus"

    def __init__(self, settings: Settings, target: str | None = None) -> None:
        self.settings = settings
        self.target = target or settings.retrieval.serving_alias
        self._client: MilvusClient | None = None
        self._lock = threading.Lock()
        self._down_until = 0.0
        # Filter expression -> (expiry on the monotonic clock, items it passes), see search_each.
        self._filter_sizes: dict[str, tuple[float, int]] = {}

    def client(self) -> MilvusClient:
        if self._client is None:
            with self._lock:
                if time.monotonic() < self._down_until:
                    raise ConnectionError("milvus marked down; retrying shortly")
                if self._client is None:
                    try:
                        self._client = connect(self.settings)
                    except Exception:
                        # Do not make every request wait for a connect timeout while it is down.
                        self._down_until = time.monotonic() + 1.0
                        raise
        return self._client

    def search(self, vector: np.ndarray, k: int, flt: SearchFilter | None = None,
               timeout_s: float | None = None) -> list[tuple[str, float]]:
        """Top-k (item_id, inner product) for one query vector."""
        return self.search_many([vector], k, flt, timeout_s)[0]

    def search_many(self, vectors: Sequence[np.ndarray], k: int, flt: SearchFilter | None = None,
                    timeout_s: float | None = None) -> list[list[tuple[str, float]]]:
        """Top-k for several query vectors in one round trip (gRPC deadline: timeout_s or milvus.timeout_s).

        The embedded Milvus' filtered HNSW search now and then answers a query with 0 or 1 hit where
        the filter passes thousands of items (100k items, region filter, k=420: ~0.3% of queries;
        asked again, or nudged by 1e-4, about half of them fail again). A reply that looks cut
        short (:meth:`_looks_cut`) is checked with :meth:`search_unfiltered`; the longer answer stands.
        """
        flt = flt or SearchFilter()
        limit, expr = k + len(flt.exclude), flt.expression()
        replies = [hits for hits, _ in self._call(vectors, limit, expr, timeout_s)]
        longest = max(map(len, replies), default=0)
        for j, hits in enumerate(replies):
            if self._looks_cut(len(hits), longest, limit, expr):
                [again] = self.search_unfiltered(vectors[j], [(flt, limit)], timeout_s)
                if len(again) <= 1:
                    self._remember_size(expr, len(again))  # the filter may pass that few: not checked again soon
                _count_cut(len(again) > len(hits))
                replies[j] = max(hits, again, key=len)
        return [_kept(hits, flt, k) for hits in replies]

    def _looks_cut(self, found: int, longest: int, limit: int, expr: str) -> bool:
        """A reply of ``found`` hits looks cut short by Milvus: under half of the longest in its call
        (every query of a call has the same filter), or 0-1 hit of more asked under a filter not
        counted that small in the last FILTER_SIZE_TTL_S."""
        if 2 * found < longest:
            return True
        if found > 1 or limit <= 1 or not expr:
            return False
        counted = self._counted_size(expr)
        return counted is None or counted > 1

    def _counted_size(self, expr: str) -> int | None:
        """How many items the filter passed when last counted (by _remember_size), while that is recent."""
        expiry, size = self._filter_sizes.get(expr, (0.0, 0))
        return size if expiry > time.monotonic() else None

    def _remember_size(self, expr: str, size: int) -> None:
        if len(self._filter_sizes) >= 10_000:
            self._filter_sizes.clear()
        self._filter_sizes[expr] = (time.monotonic() + FILTER_SIZE_TTL_S, size)

    def search_unfiltered(self, vector: np.ndarray, wants: Sequence[tuple[SearchFilter, int]],
                          timeout_s: float | None = None) -> list[list[tuple[str, float]]]:
        """For each (filter, k), up to k hits passing the filter (``exclude`` aside) from an unfiltered
        search, the filters applied here: UNFILTERED_DEPTH[0] times the k's deep; where too few of
        those passed a filter, once more as deep as the share that passed says it needs, at most
        UNFILTERED_DEPTH[1] times the k's (a filter few items pass is not hunted through the whole index)."""
        regions = ["regions"] if any(flt.region is not None for flt, _ in wants) else []
        fields = sorted({*regions, *(name for flt, _ in wants for name in flt.fields())})
        total = sum(k for _, k in wants)
        depth, deepest = min(UNFILTERED_DEPTH[0] * total, MAX_TOPK), min(UNFILTERED_DEPTH[1] * total, MAX_TOPK)
        while True:
            [(hits, columns)] = self._call([vector], depth, "", timeout_s, fields)
            out = [list(compress(hits, flt.passes(columns, len(hits))))[:k] for flt, k in wants]
            short = max(k / max(len(found), 1) for found, (_, k) in zip(out, wants, strict=True))
            if short <= 1 or len(hits) < depth or depth >= deepest:
                return out
            depth = min(math.ceil(depth * short * 1.25), deepest)

    def search_each(self, vector: np.ndarray, wants: Sequence[tuple[SearchFilter, int]],
                    timeout_s: float | None = None) -> list[list[tuple[str, float]]]:
        """For one query vector, the top k under each (filter, k): what a search per filter returns, in one call.

        The embedded Milvus charges mostly per call (a fixed ~3 ms, plus ~2 ms to check the
        region of every row), not per result: at 100k items a category search and a freshness
        search cost 5.6 and 5.9 ms of server CPU alone, 6.8 ms as one search under "region and
        (category or fresh)" returning each hit's fields. Each hit goes to every filter it
        passes, in score order. The shared search asks for twice the sum of the k's, so that
        one filter's hits crowding out another's is rare; a filter still left short while the
        shared search came back full may have more further down: it gets a search of its own,
        so each answer is still its own filter's top k. Such a search that finds fewer than k
        has found every item the filter passes; for ``FILTER_SIZE_TTL_S`` a shared answer that
        already holds that many is taken as whole (a filter that few items pass, such as fresh
        ones in a small catalogue, is not searched again on every request). Filters with
        different regions are searched one by one.
        """
        expr = SearchFilter.either([flt for flt, _ in wants]) if len(wants) > 1 else None
        if expr is None:
            return [self.search(vector, k, flt, timeout_s) for flt, k in wants]
        limit = 2 * sum(k + len(flt.exclude) for flt, k in wants)
        fields = sorted({name for flt, _ in wants for name in flt.fields()})
        [(hits, columns)] = self._call([vector], limit, expr, timeout_s, fields)
        if self._looks_cut(len(hits), 0, limit, expr):
            # (at 100k items ~3% of these shared searches came back with 0-1 hit; the same query under
            # each filter alone came back cut too, 100 times in 100): one unfiltered search for all.
            again = self.search_unfiltered(vector, [(flt, k + len(flt.exclude)) for flt, k in wants], timeout_s)
            found = sum(map(len, again))
            if found <= 1:
                self._remember_size(expr, found)
            _count_cut(found > len(hits))
            if found > len(hits):
                return [_kept(found, flt, k) for found, (flt, k) in zip(again, wants, strict=True)]
        out = [_kept(compress(hits, flt.passes(columns, len(hits))), flt, k) for flt, k in wants]
        for j, (flt, k) in enumerate(wants):
            if len(out[j]) < k and len(hits) == limit and not self._all_found(flt, len(out[j])):
                out[j] = self.search(vector, k, flt, timeout_s)
                if len(out[j]) < k and not flt.exclude:
                    self._remember_size(flt.expression(), len(out[j]))
        return out

    def _all_found(self, flt: SearchFilter, found: int) -> bool:
        """Whether ``found`` hits are all the filter passes, as its last own search counted (while that is recent)."""
        if flt.exclude:
            return False
        counted = self._counted_size(flt.expression())
        return counted is not None and found >= counted

    def _call(self, vectors: Sequence[np.ndarray], limit: int, expr: str, timeout_s: float | None,
              output_fields: Sequence[str] = ()) -> list[tuple[list[tuple[str, float]], dict[str, Sequence[Any]]]]:
        """One search request (gRPC deadline: timeout_s or milvus.timeout_s): per query, its
        (item_id, score) hits in order and the asked-for scalar columns."""
        data = [np.asarray(v, dtype=np.float32).tolist() for v in vectors]
        params = {"metric_type": "IP", "params": {"ef": max(self.settings.retrieval.ef_search, limit)}}
        search = self._search_lean if _LEAN_SEARCH else self._search_public
        return [([(str(i), float(s)) for i, s in zip(ids, scores, strict=True)], columns) for ids, scores, columns
                in search(data, limit, expr, params, timeout_s or self.settings.milvus.timeout_s, output_fields)]

    def _search_public(self, data: list[list[float]], limit: int, expr: str, params: dict, timeout: float,
                       output_fields: Sequence[str] = ()) -> list[Reply]:
        results = self.client().search(self.target, data=data, limit=limit, filter=expr, search_params=params,
                                       anns_field=VECTOR, timeout=timeout, output_fields=list(output_fields))
        out = []
        for hits in results:
            # pymilvus keeps each query's ids and distances as plain lists: reading them skips
            # materialising a dict per hit.
            ids, scores = getattr(hits, "ids", None), getattr(hits, "distances", None)
            if ids is None or scores is None:
                ids, scores = [h.get(PK, h.get("id")) for h in hits], [h["distance"] for h in hits]
            columns: dict[str, Sequence[Any]] = {name: [h["entity"][name] for h in hits] for name in output_fields}
            out.append((ids, scores, columns))
        return out

    def _search_lean(self, data: list[list[float]], limit: int, expr: str, params: dict, timeout: float,
                     output_fields: Sequence[str] = ()) -> list[Reply]:
        """The same request as ``MilvusClient.search``, its reply read straight from the protobuf.

        pymilvus turns every hit into a dict-like ``Hit`` before returning: about half of a
        search's client CPU (1.6-2.0 -> 0.9 ms for 420 hits here), under the GIL, on the
        live path's critical section. The request is built by pymilvus' own ``Prepare`` with
        the consistency pymilvus would pick, and sent on the client's own stub (its channel,
        interceptors and reconnects); only the reply's ids and scores are read. It leans on
        pymilvus internals, so it is used only where they are present (pymilvus is pinned;
        tests/integration/test_retrieval.py holds it to the public call's answers).
        """
        handler = self.client()._get_connection()
        kwargs: dict[str, Any] = {}
        default_consistency = construct_guarantee_ts(self.target, kwargs, handler.server_address, "")
        request = Prepare.search_requests_with_expr(
            collection_name=self.target, anns_field=VECTOR, param=params, limit=limit, data=data, expr=expr,
            output_fields=list(output_fields), use_default_consistency=default_consistency, **kwargs)
        response = handler._stub.Search(request, timeout=timeout)
        check_status(response.status)
        res = response.results
        ids = res.ids.str_id.data if res.ids.HasField("str_id") else res.ids.int_id.data
        columns = {f.field_name: _scalars(f) for f in res.fields_data if f.field_name in output_fields}
        out, start = [], 0
        for topk in res.topks:
            end = start + topk
            out.append((ids[start:end], res.scores[start:end], {name: c[start:end] for name, c in columns.items()}))
            start = end
        return out

    def vectors(self, item_ids: Sequence[str], timeout_s: float | None = None) -> dict[str, np.ndarray]:
        if not item_ids:
            return {}
        rows = self.client().get(self.target, ids=list(item_ids), output_fields=[VECTOR],
                                 timeout=timeout_s or self.settings.milvus.timeout_s)
        return {str(r[PK]): np.asarray(r[VECTOR], dtype=np.float32) for r in rows}

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
