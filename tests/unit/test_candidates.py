"""Candidate generation: merging, quotas, cold users and sources that fail or hang."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import numpy as np

from infra.milvus import SearchFilter
from schemas.catalog import ItemRecord
from serving.candidates import CandidateGenerator, MemoryItemIndex, MemorySignals, merge
from serving.config import RetrievalSettings
from serving.pipeline.types import UserContext


class FixedModel:
    """Stands in for the two-tower: every user points along the first axis."""

    dim = 4

    def encode_user(self, ctx: UserContext) -> np.ndarray:
        return np.array([1.0, 0.0, 0.0, 0.0], dtype=np.float32)


def catalog() -> tuple[list[ItemRecord], np.ndarray]:
    items = [
        ItemRecord(item_id="a", category="Drama", regions=None, published_at=datetime(2020, 1, 1, tzinfo=UTC)),
        ItemRecord(item_id="b", category="Drama", regions=["fr"], published_at=datetime(2024, 6, 1, tzinfo=UTC)),
        ItemRecord(item_id="c", category="Comedy", regions=["us"], published_at=datetime(2019, 1, 1, tzinfo=UTC)),
        ItemRecord(item_id="d", category="Comedy", published_at=datetime(2010, 1, 1, tzinfo=UTC)),
        ItemRecord(item_id="gone", category="Comedy", status="deleted"),
    ]
    vectors = np.array([[0.9, 0.1, 0, 0], [0.8, 0.2, 0, 0], [0.5, 0.5, 0, 0], [0.1, 0.9, 0, 0], [1, 0, 0, 0]],
                       dtype=np.float32)
    return items, vectors


def generator(config: RetrievalSettings | None = None, index=None, signals=None) -> CandidateGenerator:
    items, vectors = catalog()
    index = index or MemoryItemIndex(items, vectors, cold=[False, False, False, True, False])
    signals = signals or MemorySignals(
        neighbours={"a": [("c", 5.0), ("d", 1.0)]},
        trending={None: [("d", 9.0), ("a", 3.0)], "fr": [("b", 4.0)]},
    )
    return CandidateGenerator(config or RetrievalSettings(), FixedModel, index, signals)


def test_merge_deduplicates_and_keeps_every_source() -> None:
    merged = merge({"ann": [("x", 0.9), ("y", 0.8)], "trending": [("y", 10.0), ("z", 5.0)]}, max_candidates=10)
    by_id = {c.item_id: c for c in merged}
    assert set(by_id) == {"x", "y", "z"}
    assert by_id["y"].sources == {"ann": 0.8, "trending": 10.0}
    assert merged[0].item_id == "y"  # found by two sources ranks first
    assert by_id["y"].reasons == ["ann", "trending"]


def test_merge_cap_keeps_the_top_of_every_source() -> None:
    merged = merge({"ann": [(f"a{i}", 1.0) for i in range(10)], "fresh": [(f"f{i}", 1.0) for i in range(10)]}, 4)
    assert {c.item_id for c in merged} == {"a0", "a1", "f0", "f1"}


def test_memory_index_filters_like_milvus() -> None:
    items, vectors = catalog()
    index = MemoryItemIndex(items, vectors, cold=[False, False, False, True, False])
    query = np.array([1, 0, 0, 0], dtype=np.float32)
    assert [i for i, _ in index.search(query, 10)] == ["a", "b", "c", "d"]  # deleted item never indexed
    assert [i for i, _ in index.search(query, 10, SearchFilter(category="Comedy"))] == ["c", "d"]
    assert [i for i, _ in index.search(query, 10, SearchFilter(region="us"))] == ["a", "c", "d"]
    assert [i for i, _ in index.search(query, 10, SearchFilter(categories=("Drama", "Horror")))] == ["a", "b"]
    assert SearchFilter(categories=("A", "B")).expression() == 'category in ["A", "B"]'
    fresh = int(datetime(2024, 1, 1, tzinfo=UTC).timestamp())
    assert [i for i, _ in index.search(query, 10, SearchFilter(fresh_since=fresh))] == ["b", "d"]  # d is cold
    assert SearchFilter(category='x"y', region="fr", fresh_since=5).expression() == (
        'category == "x\\"y" and (array_length(regions) == 0 or array_contains(regions, "fr")) '
        "and (published_at >= 5 or cold == true)"
    )


def test_user_with_history_gets_every_source_without_consumed_items() -> None:
    ctx = UserContext(user_id="u", region="fr", recent=[("a", "click", 0.0)], consumed={"a"},
                      category_affinity={"Comedy": 2.0}, now=datetime(2024, 7, 1, tzinfo=UTC))
    candidates = generator().generate_sync(ctx)
    by_id = {c.item_id: c for c in candidates}
    assert "a" not in by_id and "gone" not in by_id
    assert "covisit" in by_id["c"].sources and "trending" in by_id["d"].sources
    assert by_id["b"].sources.keys() >= {"ann", "trending_region", "fresh"}
    assert "item2item" in by_id["b"].sources
    assert "content" in by_id["d"].sources  # Comedy, shown everywhere
    assert set(by_id["c"].sources) == {"covisit"}  # vector sources respect c's region (us only)


def test_cold_user_gets_popularity_region_and_profile_vector() -> None:
    ctx = UserContext(user_id="new", region="fr", now=datetime(2024, 7, 1, tzinfo=UTC))
    candidates = generator().generate_sync(ctx)
    sources = set().union(*(c.sources for c in candidates))
    assert sources >= {"ann", "trending", "trending_region", "fresh"}
    assert "covisit" not in sources and "item2item" not in sources
    # region filter: "c" is shown only in the us
    assert "c" not in {c.item_id for c in candidates if set(c.sources) <= {"ann", "fresh", "content"}}


def test_quotas_come_from_configuration() -> None:
    config = RetrievalSettings(quotas={"trending": 1, "ann": 0})
    candidates = generator(config).generate_sync(UserContext(user_id="u"))
    assert [(c.item_id, list(c.sources)) for c in candidates] == [("d", ["trending"])]


class CallCountingIndex(MemoryItemIndex):
    def __init__(self) -> None:
        items, vectors = catalog()
        super().__init__(items, vectors, cold=[False] * len(items))
        self.calls: list[int] = []  # query vectors per search call

    def search_many(self, vectors, k, flt=None, timeout_s=None):
        self.calls.append(len(vectors))
        return super().search_many(vectors, k, flt, timeout_s)


def test_ann_and_item2item_share_one_index_call_and_answer_as_alone() -> None:
    ctx = UserContext(user_id="u", region="fr", recent=[("a", "click", 0.0), ("d", "click", 0.0)],
                      consumed={"a", "d"})
    both = {"ann": 3, "item2item": 4}
    for run in ("sync", "async"):
        index = CallCountingIndex()
        gen = generator(index=index)
        candidates = (gen.generate_sync(ctx, quotas=both) if run == "sync"
                      else asyncio.run(gen.generate(ctx, quotas=both)))
        assert index.calls == [3]  # the user vector and both seeds, one call
        alone = {name: {c.item_id: c.sources[name] for c in generator(index=CallCountingIndex()).generate_sync(
            ctx, quotas={name: k})} for name, k in both.items()}
        for name, expected in alone.items():
            assert {c.item_id: c.sources[name] for c in candidates if name in c.sources} == expected
        assert alone["ann"] and alone["item2item"]


def test_either_expression_checks_the_shared_region_once() -> None:
    content = SearchFilter(categories=("Drama",), region="fr")
    fresh = SearchFilter(region="fr", fresh_since=5)
    assert SearchFilter.either([content, fresh]) == (
        '(array_length(regions) == 0 or array_contains(regions, "fr")) and '
        '((category in ["Drama"]) or ((published_at >= 5 or cold == true)))')
    assert SearchFilter.either([SearchFilter(categories=("Drama",)), SearchFilter(fresh_since=5)]) == (
        '(category in ["Drama"]) or ((published_at >= 5 or cold == true))')
    assert SearchFilter.either([content, SearchFilter(region="fr")]) == SearchFilter(region="fr").expression()
    assert SearchFilter.either([content, SearchFilter(region="us", fresh_since=5)]) is None  # searched one by one


def test_filter_passes_hits_as_its_expression_would() -> None:
    content, fresh = SearchFilter(categories=("Drama", "War")), SearchFilter(fresh_since=100)
    assert content.fields() == ("category",) and fresh.fields() == ("published_at", "cold")
    columns = {"category": ["War", "Comedy", "Drama"], "published_at": [100, 0, 99], "cold": [False, True, False]}
    assert content.passes(columns, 3) == [True, False, True]
    assert SearchFilter(category="War").passes(columns, 3) == [True, False, False]
    assert fresh.passes(columns, 3) == [True, True, False]
    assert SearchFilter(categories=("Drama",), fresh_since=100).passes(columns, 3) == [False, False, False]
    assert SearchFilter().passes({}, 2) == [True, True]


class EachCountingIndex(MemoryItemIndex):
    def __init__(self) -> None:
        items, vectors = catalog()
        super().__init__(items, vectors, cold=[False, False, False, True, False])
        self.calls: list[int] = []  # filters per search_each call

    def search_each(self, vector, wants, timeout_s=None):
        self.calls.append(len(wants))
        return super().search_each(vector, wants, timeout_s)


def test_content_and_fresh_share_one_index_call_and_answer_as_alone() -> None:
    ctx = UserContext(user_id="u", region="fr", recent=[("a", "click", 0.0)], consumed={"a"},
                      category_affinity={"Comedy": 2.0}, now=datetime(2024, 7, 1, tzinfo=UTC))
    both = {"content": 3, "fresh": 2}
    for run in ("sync", "async"):
        index = EachCountingIndex()
        candidates = (generator(index=index).generate_sync(ctx, quotas=both) if run == "sync"
                      else asyncio.run(generator(index=index).generate(ctx, quotas=both)))
        assert index.calls == [2]
        alone = {name: {c.item_id: c.sources[name] for c in generator(index=EachCountingIndex()).generate_sync(
            ctx, quotas={name: k})} for name, k in both.items()}
        for name, expected in alone.items():
            assert {c.item_id: c.sources[name] for c in candidates if name in c.sources} == expected
        assert {name: set(hits) for name, hits in alone.items()} == {"content": {"d"}, "fresh": {"b", "d"}}
    # No categories to search in: fresh alone.
    index = EachCountingIndex()
    generator(index=index).generate_sync(UserContext(user_id="new", now=ctx.now), quotas=both)
    assert index.calls == [1]
    # Sharing switched off: a search each, the same answers.
    index = EachCountingIndex()
    apart = generator(RetrievalSettings(share_filtered_search=False), index=index).generate_sync(ctx, quotas=both)
    assert index.calls == [1, 1]
    assert {c.item_id: set(c.sources) for c in apart} == {c.item_id: set(c.sources) for c in candidates}


def test_a_source_called_on_a_prepared_request_answers_at_the_size_asked() -> None:
    # Offline evaluation and the retrieval benchmark call sources one by one on prepare()'s request.
    ctx = UserContext(user_id="u", recent=[("a", "click", 0.0), ("d", "click", 0.0)], consumed={"a", "d"})
    gen = generator()
    request = gen.prepare(ctx)
    assert request.quotas == gen._quotas(None)
    assert {i for i, _ in gen.sources["ann"](request, request.quotas["ann"])} == {"b", "c"}
    assert {i for i, _ in gen.sources["item2item"](request, request.quotas["item2item"])} == {"b", "c"}
    small = gen.prepare(ctx, {"ann": 1, "item2item": 2})
    assert len(gen.sources["ann"](small, 1)) == 1 and len(gen.sources["item2item"](small, 2)) == 2


class BrokenIndex:
    name = "broken"

    def search(self, *args, **kwargs):
        raise ConnectionError("milvus is down")

    def vectors(self, *args, **kwargs):
        raise ConnectionError("milvus is down")


class SlowSignals(MemorySignals):
    def trending(self, region, k):
        time.sleep(0.5)
        return [("late", 1.0)]


def test_vector_store_down_other_sources_still_answer() -> None:
    signals = MemorySignals(neighbours={"a": [("c", 1.0)]}, trending={None: [("d", 1.0)]})
    ctx = UserContext(user_id="u", recent=[("a", "click", 0.0)], consumed={"a"})
    candidates = asyncio.run(generator(index=BrokenIndex(), signals=signals).generate(ctx))
    assert {c.item_id: set(c.sources) for c in candidates} == {"c": {"covisit"}, "d": {"trending"}}


def test_a_hanging_source_is_cut_at_its_timeout() -> None:
    config = RetrievalSettings(source_timeout_s=0.05, total_timeout_s=0.15)
    ctx = UserContext(user_id="u", recent=[("a", "click", 0.0)], consumed={"a"})
    gen = generator(config, signals=SlowSignals(neighbours={"a": [("c", 1.0)]}))
    started = time.perf_counter()
    candidates = asyncio.run(gen.generate(ctx))
    assert time.perf_counter() - started < 0.3
    ids = {c.item_id for c in candidates}
    assert "late" not in ids and "c" in ids and "b" in ids


class DeadlineIndex(MemoryItemIndex):
    """Records the deadline of each call; ``hang`` makes every search outlast any budget."""

    def __init__(self, hang: float = 0.0) -> None:  # noqa: D107
        items, vectors = catalog()
        super().__init__(items, vectors, cold=[False] * len(items))
        self.hang = hang
        self.timeouts: list[float | None] = []

    def search(self, vector, k, flt=None, timeout_s=None):
        self.timeouts.append(timeout_s)
        time.sleep(self.hang)
        return super().search(vector, k, flt)

    def vectors(self, item_ids, timeout_s=None):
        self.timeouts.append(timeout_s)
        return super().vectors(item_ids)


def test_index_calls_carry_the_source_deadline_when_serving_only() -> None:
    config = RetrievalSettings(source_timeout_s=0.07)
    ctx = UserContext(user_id="u", recent=[("a", "click", 0.0)], consumed={"a"}, category_affinity={"Drama": 1.0})
    index = DeadlineIndex()
    asyncio.run(generator(config, index=index).generate(ctx))
    assert index.timeouts and set(index.timeouts) == {0.07}
    index.timeouts.clear()
    generator(config, index=index).generate_sync(ctx)  # precompute flow: the backend's own timeout
    assert index.timeouts and set(index.timeouts) == {None}


def test_a_saturated_index_pool_does_not_starve_redis_sources() -> None:
    # One index thread, searches that hang: without a separate pool, trending would queue behind them.
    config = RetrievalSettings(source_timeout_s=0.05, total_timeout_s=0.15)
    gen = CandidateGenerator(config, FixedModel, DeadlineIndex(hang=0.4),
                             MemorySignals(trending={None: [("d", 9.0)]}),
                             executor=ThreadPoolExecutor(1))
    ctx = UserContext(user_id="u", recent=[("a", "click", 0.0)], consumed={"a"})
    candidates = asyncio.run(gen.generate(ctx))
    assert {c.item_id: set(c.sources) for c in candidates} == {"d": {"trending"}}


def test_searches_cut_at_their_deadline_are_not_logged_as_pymilvus_errors(caplog) -> None:
    import logging

    import infra.milvus  # noqa: F401 (installs the filter)

    logger = logging.getLogger("pymilvus.decorators")
    with caplog.at_level(logging.ERROR, logger="pymilvus.decorators"):
        logger.error("grpc RpcError: [search], <_InactiveRpcError: StatusCode.DEADLINE_EXCEEDED>\nTraceback: ...")
        logger.error("grpc RpcError: [search], <_InactiveRpcError: StatusCode.UNAVAILABLE>")
    assert [r.getMessage() for r in caplog.records] == ["grpc RpcError: [search], <_InactiveRpcError: StatusCode.UNAVAILABLE>"]


def test_the_callers_budget_keeps_the_sources_that_answered() -> None:
    # The caller's stage budget (150 ms) is shorter than the generator's own total (300 ms):
    # the merge must happen before it, with the fast sources, not be cancelled with all of them.
    config = RetrievalSettings(source_timeout_s=0.3, total_timeout_s=0.3)
    ctx = UserContext(user_id="u", recent=[("a", "click", 0.0)], consumed={"a"})
    gen = generator(config, signals=SlowSignals(neighbours={"a": [("c", 1.0)]}))

    async def under_budget() -> list:
        async with asyncio.timeout(0.15):
            return await gen.generate(ctx, budget_s=0.05)

    candidates = asyncio.run(under_budget())
    ids = {c.item_id for c in candidates}
    assert "late" not in ids and {"b", "c"} <= ids


def test_sources_left_behind_are_not_logged_as_unretrieved_exceptions() -> None:
    # A stage cancelled from outside leaves its source tasks to finish on their own; their
    # errors must be collected quietly, not each logged with a traceback by asyncio.
    reported: list[dict] = []
    gen = CandidateGenerator(RetrievalSettings(source_timeout_s=0.05, total_timeout_s=0.15), FixedModel,
                             BrokenIndex(), SlowSignals())

    async def scenario() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: reported.append(context))
        try:
            async with asyncio.timeout(0.02):
                await gen.generate(UserContext(user_id="u", recent=[("a", "click", 0.0)]))
        except TimeoutError:
            pass
        await asyncio.sleep(0.2)  # every source finished (or timed out) by now

    asyncio.run(scenario())
    import gc

    gc.collect()
    assert reported == []


class CountingIndex(DeadlineIndex):
    def __init__(self) -> None:  # noqa: D107
        super().__init__()
        self.fetched: list[list[str]] = []

    def vectors(self, item_ids, timeout_s=None):
        self.fetched.append(list(item_ids))
        return super().vectors(item_ids, timeout_s)


class VersionedModel(FixedModel):
    version = "v1"


def test_seed_vectors_are_fetched_once_per_model_version() -> None:
    index = CountingIndex()
    model = VersionedModel()
    gen = CandidateGenerator(RetrievalSettings(seed_vector_cache_s=60), lambda: model, index, MemorySignals())
    ctx = UserContext(user_id="u", recent=[("a", "click", 0.0), ("b", "click", 0.0)], consumed={"a", "b"})
    first = gen.generate_sync(ctx)
    gen.generate_sync(ctx)
    assert index.fetched == [["a", "b"]]
    assert [c.item_id for c in gen.generate_sync(ctx)] == [c.item_id for c in first]
    model.version = "v2"  # a new model went live: its vectors differ
    gen.generate_sync(ctx)
    assert index.fetched == [["a", "b"], ["a", "b"]]
    off = CandidateGenerator(RetrievalSettings(seed_vector_cache_s=0), lambda: model, index, MemorySignals())
    off.generate_sync(ctx)
    off.generate_sync(ctx)
    assert len(index.fetched) == 4


class MissingCollectionIndex(DeadlineIndex):
    """Fails every search the way Milvus does when the live model's collection is gone."""

    def search(self, vector, k, flt=None, timeout_s=None):
        from pymilvus.exceptions import MilvusException

        raise MilvusException(code=100, message="collection not found[collection=items_v1]")


def test_a_failed_source_is_reported_with_the_backends_message() -> None:
    # pymilvus' exception keeps its message out of args: repr() alone said "MilvusException()".
    gen = CandidateGenerator(RetrievalSettings(), FixedModel, MissingCollectionIndex(), MemorySignals())
    trace: dict = {}
    asyncio.run(gen.generate(UserContext(user_id="u"), quotas={"ann": 5}, trace=trace))
    assert "collection not found[collection=items_v1]" in trace["failed"]["ann"]
    assert trace["failed"]["ann"].startswith("MilvusException: ")
