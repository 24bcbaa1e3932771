"""The quality replay's protocol through the pipeline's own code in one process: for tuning, no stack.

    python -m bench.pipeline_replay [--start 0.7 --end 0.8] [--every 10] [--weights '{"covisit": 1.0}']

In: MovieLens-100K. Out: printed NDCG@10 / HR@10 of the pipeline and of
most-popular on the same asks, and where the held-out item was (candidates,
light top ``light_keep``, top 10). Nothing is saved: this is the validation
harness; the reported figures come from bench/quality.py on the live stack.

What runs: the two-tower trained on events[:start]; the features flow's user
and item logic (model.ranker.FeatureReplay) and the co-visitation flow's three
stateful steps (flows.covisit), driven event by event; the real
CandidateGenerator over an in-memory exact index (MemoryItemIndex) and those
signals; light_rank with the configured (or given) weights; the policy
re-rank. The protocol is bench/quality.py's default: every ``--every``-th
event in [start, end) is asked about after every earlier event was applied.
Default window: 70-80% of the log, i.e. inside the quality benchmark's warm-up,
so tuning here never sees its test events. Differences from the live run:
exact search instead of HNSW, no time budgets (no fallbacks), ``now`` is the
event's time, and the light-rank weights can be swept over cached candidates.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench import metrics
from demo.movielens import MovieLens, load_movielens
from schemas.events import InteractionEvent
from serving.config import Settings
from serving.pipeline.types import Candidate, UserContext

K = 10


class CovisitReplay:
    """flows/covisit.py's count_users -> pair_recent -> neighbours steps, applied in process."""

    def __init__(self, settings: Settings) -> None:
        self.cfg = settings.features
        self.counts: dict[str, Any] = {}
        self.pairs: dict[str, Any] = {}
        self.neighbours: dict[str, Any] = {}

    def apply(self, event: InteractionEvent) -> None:
        from flows.covisit import CONSUMED_TYPES, CountUsersLogic, NeighbourLogic, PairLogic

        if str(event.interaction_type.value) not in CONSUMED_TYPES:
            return
        counter = self.counts.setdefault(event.item_id, CountUsersLogic(None))
        counted, _ = counter.on_batch([(event.user_id, event.item_id, event.timestamp.timestamp())])
        if not counted:
            return
        pairs, _ = self.pairs.setdefault(event.user_id, PairLogic(self.cfg, None)).on_batch(counted)
        for item_id, value in pairs:
            self.neighbours.setdefault(item_id, NeighbourLogic(self.cfg, None)).on_batch([(item_id, value)])

    def top(self, item_id: str, k: int) -> list[tuple[str, float]]:
        from flows.covisit import top_neighbours

        logic = self.neighbours.get(item_id)
        return top_neighbours(logic.state, min(k, self.cfg.covisit_top_k)) if logic is not None else []


class ReplaySignals:
    """The Signals interface over the replayed flow state (trending cached until ``invalidate``)."""

    def __init__(self, features: Any, covisit: CovisitReplay) -> None:
        self.features = features
        self.covisit = covisit
        self._trending: dict[str | None, list[tuple[str, float]]] = {}

    def neighbours(self, item_ids: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
        return [self.covisit.top(item_id, k) for item_id in item_ids]

    def trending(self, region: str | None, k: int) -> list[tuple[str, float]]:
        if region not in self._trending:
            self._trending[region] = self.features.trending(region, 500)
        return self._trending[region][:k]

    def invalidate(self) -> None:
        self._trending.clear()


@dataclass
class Ask:
    ctx: UserContext
    candidates: list[Candidate]
    items: dict[str, dict[str, Any]]
    target: str
    cold: bool


def collect_asks(settings: Settings, data: MovieLens, start: int, end: int, every: int) -> list[Ask]:
    """Train on events[:start]; candidates for every ``every``-th event in [start, end), state up to date."""
    from model.ranker import FeatureReplay
    from model.train import train_two_tower
    from serving.candidates.backends import MemoryItemIndex
    from serving.candidates.generator import CandidateGenerator

    events = data.interactions
    profiles = {u.user_id: u for u in data.users}
    model = train_two_tower(events[:start], data.items, profiles, settings.model, version="replay")
    index = MemoryItemIndex(data.items, model.encode_items(data.items), [not model.knows(i.item_id) for i in data.items])
    features = FeatureReplay(settings, data.items, profiles)
    covisit = CovisitReplay(settings)
    signals = ReplaySignals(features, covisit)
    generator = CandidateGenerator(settings.retrieval, lambda: model, index, signals)
    seen: Counter[str] = Counter()
    asks: list[Ask] = []
    for n, event in enumerate(events[:end]):
        if n >= start and (n - start) % every == 0:
            signals.invalidate()
            ctx = features.context(event.user_id, "homepage", event.timestamp.timestamp())
            ctx.limit = K
            candidates = generator.generate_sync(ctx)
            items = features.item_documents([c.item_id for c in candidates])
            asks.append(Ask(ctx, candidates, items, event.item_id, seen[event.user_id] < 5))
        features.apply(event)
        covisit.apply(event)
        seen[event.user_id] += 1
    return asks


def score_asks(settings: Settings, asks: Sequence[Ask], weights: Mapping[str, float] | None = None,
               policy: bool = True) -> dict[str, float]:
    """Light rank (+ policies) over cached candidates; NDCG@10 and where the target landed."""
    from serving.pipeline.policies import PolicyConfig, PolicyEngine
    from serving.pipeline.ranking import light_rank

    weights = weights or settings.recommend.source_weights
    engine = PolicyEngine(PolicyConfig.load(settings.recommend.policy_path or None), seed=7)
    ndcg, cold, hits, found, shortlisted, top = [], [], [], [], [], []
    for ask in asks:
        candidates = [copy.deepcopy(c) for c in ask.candidates]
        shortlist = light_rank(candidates, ask.ctx, ask.items, weights, settings.recommend.light_keep)
        ids = [c.item_id for c in shortlist]
        found.append(any(c.item_id == ask.target for c in ask.candidates))
        shortlisted.append(ask.target in ids)
        top.append(ask.target in ids[:K])
        page = engine.rerank(shortlist, ask.items, ask.ctx, exposure={}) if policy else shortlist[:K]
        recs = [c.item_id for c in page][:K]
        ndcg.append(metrics.ndcg_at_k(recs, ask.target, K))
        hits.append(metrics.hit_at_k(recs, ask.target, K))
        if ask.cold:
            cold.append(ndcg[-1])
    return {"ndcg@10": float(np.mean(ndcg)), "hr@10": float(np.mean(hits)),
            "ndcg@10_cold_users": float(np.mean(cold)) if cold else 0.0,
            "target_in_candidates": float(np.mean(found)), "target_in_light_keep": float(np.mean(shortlisted)),
            "target_in_light_top10": float(np.mean(top)), "asks": float(len(asks))}


def most_popular(data: MovieLens, start: int, end: int, every: int) -> float:
    """Most-popular NDCG@10 on the same asks (all-time consumer counts, consumed items excluded)."""
    counts: Counter[str] = Counter()
    consumed: dict[str, set[str]] = {}
    gains = []
    for n, event in enumerate(data.interactions[:end]):
        if n >= start and (n - start) % every == 0:
            mine = consumed.get(event.user_id, set())
            ranked = sorted(counts, key=lambda i: (-counts[i], i))
            gains.append(metrics.ndcg_at_k([i for i in ranked if i not in mine][:K], event.item_id, K))
        if event.item_id not in consumed.setdefault(event.user_id, set()):
            counts[event.item_id] += 1
            consumed[event.user_id].add(event.item_id)
    return float(np.mean(gains))


def main(argv: list[str] | None = None) -> int:
    from serving.config import load_settings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--start", type=float, default=0.7, help="fraction of the log before the first ask")
    parser.add_argument("--end", type=float, default=0.8, help="fraction of the log after the last ask")
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--model", default="{}", help="ModelSettings overrides, JSON")
    parser.add_argument("--weights", default="{}",
                        help='light-rank weight overrides, JSON; a list sweeps: {"covisit": [0.3, 1.0]}')
    args = parser.parse_args(argv)
    settings = load_settings()
    settings.model = settings.model.model_copy(update=json.loads(args.model))
    data = load_movielens()
    start, end = int(len(data.interactions) * args.start), int(len(data.interactions) * args.end)
    t0 = time.perf_counter()
    asks = collect_asks(settings, data, start, end, args.every)
    print(f"{len(asks)} asks in {time.perf_counter() - t0:.0f}s; most-popular NDCG@10 "
          f"{most_popular(data, start, end, args.every):.4f}")
    overrides = json.loads(args.weights)
    grid = {k: v if isinstance(v, list) else [v] for k, v in overrides.items()}
    for values in itertools.product(*grid.values()) if grid else [()]:
        chosen = dict(zip(grid, values, strict=True))
        result = score_asks(settings, asks, {**settings.recommend.source_weights, **chosen})
        print(json.dumps(chosen), {k: round(v, 4) for k, v in result.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
