"""Pure ranking metrics shared by the quality replay and the offline protocol.

In: recommended lists (item ids, best first), the held-out item(s), item genres
and popularity counts. Out: floats. No I/O, no state: unit-tested on tiny
hand-computed cases in tests/unit/test_metrics.py.

Definitions (k = 10 everywhere in the benchmarks):
- hit rate: 1 if the held-out item is in the top k (one target per event);
- NDCG (one target): 1 / log2(rank + 2) for a 0-based rank < k, else 0 (ideal DCG = 1);
- NDCG, precision, recall, MAP (a set of targets, offline protocol): binary relevance, as in
  Microsoft Recommenders' ``python_evaluation`` (IDCG over min(k, |targets|) positions;
  MAP's average precision divides by |targets|, its ``map_at_k`` of the published table);
- catalog coverage: distinct items recommended over the whole run / catalog size;
- intra-list diversity: mean over pairs in one list of (1 - Jaccard of the two genre sets);
- novelty: mean self-information -log2(p(i)) of the recommended items, p(i) = the share of
  users who had consumed i when the list was made (+1 smoothing so unseen items are finite).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence


def hit_at_k(recommended: Sequence[str], target: str, k: int = 10) -> float:
    return 1.0 if target in recommended[:k] else 0.0


def ndcg_at_k(recommended: Sequence[str], target: str, k: int = 10) -> float:
    """NDCG of one held-out item (the prequential case): the ideal list has it first."""
    for rank, item in enumerate(recommended[:k]):
        if item == target:
            return 1.0 / math.log2(rank + 2)
    return 0.0


def precision_at_k(recommended: Sequence[str], relevant: Collection[str], k: int = 10) -> float:
    return sum(1 for item in recommended[:k] if item in relevant) / k


def recall_at_k(recommended: Sequence[str], relevant: Collection[str], k: int = 10) -> float:
    if not relevant:
        return 0.0
    return sum(1 for item in recommended[:k] if item in relevant) / len(relevant)


def ndcg_set_at_k(recommended: Sequence[str], relevant: Collection[str], k: int = 10) -> float:
    """Binary-relevance NDCG of a list against a set of held-out items."""
    if not relevant:
        return 0.0
    dcg = sum(1.0 / math.log2(rank + 2) for rank, item in enumerate(recommended[:k]) if item in relevant)
    idcg = sum(1.0 / math.log2(rank + 2) for rank in range(min(k, len(relevant))))
    return dcg / idcg


def average_precision_at_k(recommended: Sequence[str], relevant: Collection[str], k: int = 10) -> float:
    """Sum of precision@rank at each hit in the top k, divided by |relevant| (Recommenders' MAP)."""
    if not relevant:
        return 0.0
    hits, total = 0, 0.0
    for rank, item in enumerate(recommended[:k]):
        if item in relevant:
            hits += 1
            total += hits / (rank + 1)
    return total / len(relevant)


def catalog_coverage(lists: Iterable[Sequence[str]], catalog_size: int) -> float:
    if catalog_size <= 0:
        return 0.0
    seen: set[str] = set()
    for recommended in lists:
        seen.update(recommended)
    return len(seen) / catalog_size


def genre_distance(a: Collection[str], b: Collection[str]) -> float:
    """1 - Jaccard similarity of two genre sets (two items without genres are identical)."""
    sa, sb = set(a), set(b)
    union = sa | sb
    if not union:
        return 0.0
    return 1.0 - len(sa & sb) / len(union)


def intra_list_diversity(recommended: Sequence[str], genres: Mapping[str, Collection[str]]) -> float:
    """Mean pairwise genre distance within one list (0: all alike, 1: no genre shared)."""
    n = len(recommended)
    if n < 2:
        return 0.0
    total = 0.0
    for i in range(n):
        gi = genres.get(recommended[i], ())
        for j in range(i + 1, n):
            total += genre_distance(gi, genres.get(recommended[j], ()))
    return total / (n * (n - 1) / 2)


def novelty(recommended: Sequence[str], consumers: Mapping[str, int], n_users: int) -> float:
    """Mean -log2 of the share of users who consumed each item (rarer = more novel)."""
    if not recommended:
        return 0.0
    return sum(-math.log2((consumers.get(item, 0) + 1) / (n_users + 1)) for item in recommended) / len(recommended)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
