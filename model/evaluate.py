"""Offline metrics of candidate generation on a time-ordered split of the log.

    python -m model.evaluate            # MovieLens-100K, 80/20 by time; prints and saves JSON

In: events (time-ordered), the catalog, user profiles and a model trained on
the first part. Out: recall@K of the merged candidate set and of each source
over the held-out events, saved under bench/results/.

Protocol: the held-out events are replayed in time order; before each one the
generator is asked for candidates with the user's history *up to that event*
(test then learn, for the history only: the model, co-visitation and trending
stay as they were at the split, the conservative case). An event is a hit when
its item is among the candidates. Items the user already consumed are
excluded, as in serving. Co-visitation and trending are computed here from
the training part the way the features flow computes them online.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections import Counter, defaultdict, deque
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from model.two_tower import NEGATIVE_TYPES, TwoTowerModel
from schemas.catalog import ItemRecord, UserProfile
from schemas.events import InteractionEvent
from serving.candidates.backends import ItemIndex, MemoryItemIndex, MemorySignals
from serving.candidates.generator import CandidateGenerator, merge
from serving.config import RetrievalSettings, Settings
from serving.pipeline.types import UserContext

log = logging.getLogger(__name__)
RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


def time_split(events: Sequence[InteractionEvent], holdout: float) -> tuple[list[InteractionEvent], list[InteractionEvent]]:
    ordered = sorted(events, key=lambda e: (e.timestamp, e.user_id, e.item_id))
    cut = int(len(ordered) * (1 - holdout))
    return ordered[:cut], ordered[cut:]


def covisitation(events: Sequence[InteractionEvent], window: int = 5, top: int = 200) -> dict[str, list[tuple[str, float]]]:
    """Items co-consumed within ``window`` consecutive events of one user, weight 1 per pair."""
    pairs: dict[str, Counter[str]] = defaultdict(Counter)
    recent: dict[str, deque[str]] = defaultdict(lambda: deque(maxlen=window))
    for event in events:
        if event.interaction_type in NEGATIVE_TYPES:
            continue
        past = recent[event.user_id]
        for other in past:
            if other != event.item_id:
                pairs[event.item_id][other] += 1.0
                pairs[other][event.item_id] += 1.0
        past.append(event.item_id)
    return {item: [(o, float(w)) for o, w in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]
            for item, c in pairs.items()}


def trending(events: Sequence[InteractionEvent], users: Mapping[str, UserProfile], half_life_days: float = 7.0,
             top: int = 1000) -> dict[str | None, list[tuple[str, float]]]:
    """Exponentially decayed popularity at the end of ``events``, globally and per user region."""
    if not events:
        return {}
    end = events[-1].timestamp.timestamp()
    scores: dict[str | None, Counter[str]] = defaultdict(Counter)
    for event in events:
        if event.interaction_type in NEGATIVE_TYPES:
            continue
        weight = math.exp(-math.log(2) * (end - event.timestamp.timestamp()) / (half_life_days * 86400))
        scores[None][event.item_id] += weight
        user = users.get(event.user_id)
        region = event.region or (user.region if user else None)
        if region:
            scores[region][event.item_id] += weight
    return {r: sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:top] for r, c in scores.items()}


def category_affinity(history: Sequence[str], catalog: Mapping[str, ItemRecord], decay: float = 0.95) -> dict[str, float]:
    """Decayed counts of the categories of the recent items (most recent first), as the features flow keeps."""
    affinity: dict[str, float] = defaultdict(float)
    for rank, item_id in enumerate(history[:100]):
        item = catalog.get(item_id)
        if item is not None and item.category:
            affinity[item.category] += decay**rank
    return dict(affinity)


def build_memory_generator(model: TwoTowerModel, items: Sequence[ItemRecord], train: Sequence[InteractionEvent],
                           users: Mapping[str, UserProfile], config: RetrievalSettings) -> CandidateGenerator:
    vectors = model.encode_items(items)
    index = MemoryItemIndex(items, vectors, [not model.knows(i.item_id) for i in items])
    signals = MemorySignals(covisitation(train), trending(train, users))
    return CandidateGenerator(config, lambda: model, index, signals)


def evaluate_candidates(model: TwoTowerModel, items: Sequence[ItemRecord], users: Mapping[str, UserProfile],
                        train: Sequence[InteractionEvent], test: Sequence[InteractionEvent],
                        config: RetrievalSettings, k: int = 500, stride: int = 1) -> dict[str, float]:
    """recall@k of the merged set and of each source (each source alone asked for k)."""
    generator = build_memory_generator(model, items, train, users, config)
    catalog = {item.item_id: item for item in items}
    history: dict[str, list[str]] = defaultdict(list)  # most recent first
    for event in train:
        if event.interaction_type not in NEGATIVE_TYPES:
            history[event.user_id].insert(0, event.item_id)
    quotas = {name: q for name, q in config.quotas.items() if q > 0}
    hits: Counter[str] = Counter()
    evaluated = cold = 0
    sizes = []
    started = time.perf_counter()
    for n, event in enumerate(test):
        if event.interaction_type in NEGATIVE_TYPES:
            continue
        past = history[event.user_id]
        if n % stride == 0:
            user = users.get(event.user_id)
            ctx = UserContext(
                user_id=event.user_id, region=user.region if user else None, language=user.language if user else None,
                age_bucket=user.age_bucket if user else None,
                recent=[(i, "watch", 0.0) for i in past[: model.config.history_len]], consumed=set(past),
                category_affinity=category_affinity(past, catalog), now=event.timestamp,
            )
            request = generator.prepare(ctx, {name: max(k, q) for name, q in quotas.items()})
            per_source = {name: generator.sources[name](request, size) for name, size in request.quotas.items()}
            merged = merge({name: rows[: quotas[name]] for name, rows in per_source.items()}, k)
            sizes.append(len(merged))
            evaluated += 1
            cold += not past
            hits["merged"] += any(c.item_id == event.item_id for c in merged)
            for name, rows in per_source.items():
                hits[name] += any(item_id == event.item_id for item_id, _ in rows[:k])
        past.insert(0, event.item_id)
    metrics = {f"recall@{k}_{name}": round(count / max(evaluated, 1), 4) for name, count in hits.items()}
    metrics.update(test_events=evaluated, cold_user_share=round(cold / max(evaluated, 1), 4),
                   mean_candidates=round(float(np.mean(sizes)) if sizes else 0.0, 1),
                   eval_seconds=round(time.perf_counter() - started, 1))
    return metrics


def ann_recall_vs_exact(ann: ItemIndex, exact: ItemIndex, queries: np.ndarray, k: int = 100) -> float:
    """Mean overlap of ANN top-k with exact top-k (recall of the approximate index)."""
    overlaps = []
    for query in queries:
        truth = {i for i, _ in exact.search(query, k)}
        found = {i for i, _ in ann.search(query, k)}
        overlaps.append(len(truth & found) / max(len(truth), 1))
    return float(np.mean(overlaps))


def evaluate_movielens(settings: Settings, stride: int = 1, k: int = 500) -> dict[str, object]:
    """Train on the first 80% of MovieLens-100K by time, evaluate candidates on the last 20%."""
    from demo.movielens import load_movielens
    from model.train import train_two_tower

    ml = load_movielens()
    users = {u.user_id: u for u in ml.users}
    train, test = time_split(ml.interactions, settings.model.eval_holdout)
    started = time.perf_counter()
    model = train_two_tower(train, ml.items, users, settings.model, version="offline")
    train_s = time.perf_counter() - started
    metrics = evaluate_candidates(model, ml.items, users, train, test, settings.retrieval, k=k, stride=stride)
    return {"dataset": "movielens-100k", "split": f"time-ordered {1 - settings.model.eval_holdout:.0%}/"
            f"{settings.model.eval_holdout:.0%}", "train_seconds": round(train_s, 1),
            "quotas": settings.retrieval.quotas, "metrics": metrics}


def main(argv: list[str] | None = None) -> int:
    from serving.config import load_settings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stride", type=int, default=1, help="evaluate every n-th held-out event")
    parser.add_argument("-k", type=int, default=500)
    parser.add_argument("--out", type=Path, default=RESULTS / "retrieval_offline.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    report = evaluate_movielens(load_settings(), stride=args.stride, k=args.k)
    print(json.dumps(report, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
