"""MilvusItemIndex's bookkeeping around its searches: which filters search_each searches again after
the shared search, and which queries of a multi-query reply search_many asks for again.

The searches are canned here (the logic between them is pure); tests/integration/test_retrieval.py
runs the same methods on the real Milvus.
"""

from __future__ import annotations

import numpy as np

import infra.milvus
from infra.milvus import MilvusItemIndex, SearchFilter
from serving.config import Settings

WIDE = SearchFilter(categories=("Drama",), region="fr")
NARROW = SearchFilter(region="fr", fresh_since=100)


class CannedIndex(MilvusItemIndex):
    """The shared search answers ``shared`` (item, category, published_at); a filter's own search
    answers every item of ``catalogue`` it passes."""

    def __init__(self, catalogue: list[tuple[str, str, int]]) -> None:
        super().__init__(Settings())
        self.catalogue = catalogue
        self.own_searches: list[str] = []

    def _call(self, vectors, limit, expr, timeout_s, output_fields=()):
        rows = [r for r in self.catalogue if self._passes(WIDE, r) or self._passes(NARROW, r)]
        rows = rows[:limit]
        columns = {"category": [r[1] for r in rows], "published_at": [r[2] for r in rows],
                   "cold": [False] * len(rows)}
        return [([(r[0], 1.0 - n / 1000) for n, r in enumerate(rows)], columns)]

    def search(self, vector, k, flt=None, timeout_s=None):
        self.own_searches.append(flt.expression())
        rows = [r for r in self.catalogue if self._passes(flt, r)][:k]
        return [(r[0], 1.0) for r in rows]

    @staticmethod
    def _passes(flt: SearchFilter, r: tuple[str, str, int]) -> bool:
        return flt.passes({"category": [r[1]], "published_at": [r[2]], "cold": [False]}, 1)[0]


def catalogue(dramas: int, fresh: int) -> list[tuple[str, str, int]]:
    """Dramas (old) first, then fresh comedies: the shared search meets the dramas first."""
    return [(f"d{n}", "Drama", 0) for n in range(dramas)] + [(f"f{n}", "Comedy", 500) for n in range(fresh)]


def test_a_filter_crowded_out_of_a_full_shared_answer_is_searched_on_its_own() -> None:
    index = CannedIndex(catalogue(dramas=100, fresh=50))
    wide, narrow = index.search_each(np.zeros(4), [(WIDE, 20), (NARROW, 20)])  # shared limit 80: 80 dramas
    assert len(wide) == 20 and [i for i, _ in narrow] == [f"f{n}" for n in range(20)]
    assert index.own_searches == [NARROW.expression()]


def test_a_shared_answer_that_was_not_full_holds_everything() -> None:
    index = CannedIndex(catalogue(dramas=30, fresh=5))
    wide, narrow = index.search_each(np.zeros(4), [(WIDE, 20), (NARROW, 20)])
    assert (len(wide), len(narrow)) == (20, 5) and index.own_searches == []


def test_a_filter_counted_small_is_not_searched_again_while_the_count_is_recent(monkeypatch) -> None:
    dramas_first = catalogue(dramas=85, fresh=10)
    index = CannedIndex(dramas_first)
    wants = [(WIDE, 20), (NARROW, 25)]  # shared limit 90: 85 dramas, then 5 of the 10 fresh items
    _, narrow = index.search_each(np.zeros(4), wants)
    assert len(narrow) == 10 and len(index.own_searches) == 1  # its own search: only 10 pass it
    index.search_each(np.zeros(4), wants)
    assert len(index.own_searches) == 2  # 5 found of the 10 counted: searched again
    index.catalogue = dramas_first[85:] + dramas_first[:85]  # the shared answer now holds all 10
    _, narrow = index.search_each(np.zeros(4), wants)
    assert len(narrow) == 10 and len(index.own_searches) == 2  # all 10 counted found: taken as whole
    monkeypatch.setattr(infra.milvus.time, "monotonic", lambda: 1e12)  # the count is stale
    index.search_each(np.zeros(4), wants)
    assert len(index.own_searches) == 3


def test_filters_over_different_regions_are_searched_one_by_one() -> None:
    other = SearchFilter(region="us", fresh_since=100)
    index = CannedIndex(catalogue(dramas=10, fresh=10))
    index.search_each(np.zeros(4), [(WIDE, 5), (other, 5)])
    assert index.own_searches == [WIDE.expression(), other.expression()]


class TruncatingIndex(MilvusItemIndex):
    """Answers ``lengths[j]`` hits for query j of a call (as the embedded Milvus now and then answers
    one with 0 or 1 hit) and, to an unfiltered search, ``limit`` old dramas whose regions cycle
    through ["fr"], ["us"] and none (shown everywhere)."""

    def __init__(self, lengths: list[int]) -> None:
        super().__init__(Settings())
        self.lengths = lengths
        self.calls: list[tuple[int, int, str]] = []

    def _call(self, vectors, limit, expr, timeout_s, output_fields=()):
        self.calls.append((len(vectors), limit, expr))
        if not expr:
            regions = [(["fr"], ["us"], [])[n % 3] for n in range(limit)]
            return [([(f"u{n}", 1.0) for n in range(limit)],
                     {"regions": regions, "category": ["Drama"] * limit, "published_at": [0] * limit,
                      "cold": [False] * limit})]
        return [([(f"q{round(float(v[0]))}-{n}", 1.0) for n in range(min(m, limit))], {})
                for v, m in zip(vectors, self.lengths, strict=True)]


def queries(n: int) -> list[np.ndarray]:
    return [np.full(4, j, dtype=np.float32) for j in range(n)]


def test_a_query_cut_short_in_a_multi_query_reply_is_answered_by_an_unfiltered_search() -> None:
    index = TruncatingIndex(lengths=[420, 1, 420, 420])
    replies = index.search_many(queries(4), 420, SearchFilter(region="fr"))
    assert [len(r) for r in replies] == [420] * 4
    assert index.calls[1] == (1, 4 * 420, "")  # unfiltered, four times as deep
    # The region applied here: items in "us" dropped, "fr" and shown-everywhere kept, in order.
    assert [i for i, _ in replies[1][:4]] == ["u0", "u2", "u3", "u5"]


def test_queries_equally_short_are_all_the_filter_passes_and_not_searched_again() -> None:
    index = TruncatingIndex(lengths=[30, 30, 29])
    assert [len(r) for r in index.search_many(queries(3), 420, SearchFilter(region="fr"))] == [30, 30, 29]
    assert len(index.calls) == 1


def cut_replies(repaired: str) -> float:
    from serving.metrics import ANN_REPLIES_CUT

    return ANN_REPLIES_CUT.labels(repaired=repaired)._value.get()


def test_a_lone_query_answered_with_one_hit_is_checked_and_a_small_filter_remembered() -> None:
    index = TruncatingIndex(lengths=[1])
    repaired, not_repaired = cut_replies("true"), cut_replies("false")
    assert len(index.search(queries(1)[0], 100, SearchFilter(region="fr"))) == 100
    assert [c[2] for c in index.calls] == [SearchFilter(region="fr").expression(), ""]
    assert cut_replies("true") == repaired + 1  # operators see it: recsys_ann_replies_cut_total
    # A filter the unfiltered search finds nothing for either: the 1 hit stands, and for a while
    # its next 0-1 hit answers are taken as they are.
    westerns = SearchFilter(categories=("Western",), region="fr")
    index.calls.clear()
    assert len(index.search(queries(1)[0], 100, westerns)) == 1
    assert len(index.search(queries(1)[0], 100, westerns)) == 1
    assert [c[2] for c in index.calls] == [westerns.expression(), "", "", westerns.expression()]  # 4x, then 16x deep
    assert cut_replies("false") == not_repaired + 1


def test_a_shared_search_cut_short_is_answered_by_one_unfiltered_search() -> None:
    index = TruncatingIndex(lengths=[0])
    wide, narrow = index.search_each(queries(1)[0], [(SearchFilter(categories=("Drama",), region="fr"), 20),
                                                     (SearchFilter(region="fr", fresh_since=100), 20)])
    assert [i for i, _ in wide[:3]] == ["u0", "u2", "u3"] and len(wide) == 20
    assert narrow == []  # the old dramas: none is fresh
    # One unfiltered search, then one 16 times as deep as the 40 asked for: 4 times found no fresh item.
    assert [(c[1], c[2]) for c in index.calls[1:]] == [(4 * 40, ""), (16 * 40, "")]
