"""The heavy ranker: a small torch MLP over ``serving.pipeline.ranking.ranking_rows``.

In: the interaction log in time order, the catalog, user profiles and the
two-tower model of the same version. Out: ``ranker.pt`` + ``ranker.json`` in
that version's folder, loaded by the API and the precompute flow as
``HeavyRanker``.

Training replays the log through the *serving* code, so there is no second
implementation to drift: user and item feature documents are built by the
features flow's own state logic (flows/features.py), candidates by the
CandidateGenerator over an exact in-memory index of the model's item vectors,
the shortlist by ``light_rank``. For a sample of events, the request the user
would have made just before the event is replayed; the item they then
interacted with is the positive, the rest of the shortlist the negatives.
Requests whose positive is not in the shortlist carry no ranking signal and
are skipped (that is candidate recall, measured elsewhere).
Known gap: co-visitation neighbours are not replayed, so ``src_covisit`` is
always 0 in training and the model learns no weight for it.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from schemas.catalog import ItemRecord, UserProfile
from schemas.events import InteractionEvent
from serving.config import Settings
from serving.pipeline.ranking import FEATURE_NAMES, light_rank, ranking_rows
from serving.pipeline.types import Candidate, UserContext

log = logging.getLogger(__name__)

WEIGHTS = "ranker.pt"
META = "ranker.json"


class RankerNet(nn.Module):
    def __init__(self, n_features: int, hidden: int = 32) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden // 2),
                                    nn.ReLU(), nn.Linear(hidden // 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1)


class HeavyRanker:
    """Scores a shortlist; the light order breaks ties. Thread-safe (no state per call)."""

    def __init__(self, net: RankerNet, mean: np.ndarray, std: np.ndarray, meta: dict[str, Any]) -> None:
        self.net = net.eval()
        self.mean = mean.astype(np.float32)
        self.std = std.astype(np.float32)
        self.meta = meta

    def scores(self, rows: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            x = torch.from_numpy((rows.astype(np.float32) - self.mean) / self.std)
            return torch.sigmoid(self.net(x)).numpy()

    def rank(self, ctx: UserContext, candidates: list[Candidate], items: Mapping[str, Mapping[str, Any]]) -> list[Candidate]:
        if not candidates:
            return candidates
        current = (items.get(ctx.current_item_id or "") or {}).get("category")
        rows = np.array(ranking_rows(ctx, candidates, items, current))
        for candidate, score in zip(candidates, self.scores(rows), strict=True):
            candidate.score = float(score)
        return sorted(candidates, key=lambda c: -c.score)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.net.state_dict(), folder / WEIGHTS)
        (folder / META).write_text(json.dumps({**self.meta, "mean": self.mean.tolist(), "std": self.std.tolist()}))

    @classmethod
    def load(cls, folder: Path) -> HeavyRanker | None:
        """The ranker saved in a model version's folder, or None if that version has none."""
        folder = Path(folder)
        if not (folder / META).exists():
            return None
        meta = json.loads((folder / META).read_text())
        if meta.get("features") != list(FEATURE_NAMES):
            log.warning("ranker_feature_mismatch folder=%s: not loaded (retrain)", folder)
            return None
        net = RankerNet(len(FEATURE_NAMES), meta.get("hidden", 32))
        net.load_state_dict(torch.load(folder / WEIGHTS, weights_only=True))
        return cls(net, np.array(meta.pop("mean")), np.array(meta.pop("std")), meta)


# -- replay: the same feature documents the flows write, built in process ------------------
class FeatureReplay:
    """The features flow's per-user and per-item state logic, driven directly (no broker)."""

    def __init__(self, settings: Settings, items: Sequence[ItemRecord], users: Mapping[str, UserProfile]) -> None:
        from flows.features import ItemLogic, UserLogic

        self.cfg = settings.features
        self._item_logic, self._user_logic = ItemLogic, UserLogic
        self.items: dict[str, Any] = {}
        self.users: dict[str, Any] = {}
        self.profiles = users
        for record in items:
            self._item(record.item_id).on_batch([("meta", record)])

    def _item(self, item_id: str) -> Any:
        if item_id not in self.items:
            self.items[item_id] = self._item_logic(self.cfg, None)
        return self.items[item_id]

    def apply(self, event: InteractionEvent) -> None:
        region = (self.profiles.get(event.user_id) or UserProfile(user_id=event.user_id)).region
        out, _ = self._item(event.item_id).on_batch([("event", (event, region))])
        for _, (enriched, category) in out:
            if event.user_id not in self.users:
                self.users[event.user_id] = self._user_logic(self.cfg, None)
            self.users[event.user_id].on_batch([(enriched, category)])

    def item_documents(self, item_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        from flows.features import item_document

        return {i: item_document(self.items[i].state, self.cfg) for i in item_ids if i in self.items}

    def context(self, user_id: str, surface: str, now: float) -> UserContext:
        from datetime import UTC, datetime

        from flows.features import user_document
        from serving.features import context_from_documents

        profile = self.profiles.get(user_id)
        logic = self.users.get(user_id)
        doc = user_document(logic.state, self.cfg) if logic is not None else {}
        ctx = context_from_documents(user_id, profile.model_dump(mode="json") if profile else {}, doc)
        ctx.surface = surface
        ctx.now = datetime.fromtimestamp(now, UTC)
        return ctx

    def trending(self, region: str | None, k: int) -> list[tuple[str, float]]:
        scope = region or ""
        rows = [(i, logic.state.trending[scope]) for i, logic in self.items.items() if scope in logic.state.trending]
        rows.sort(key=lambda r: -r[1])
        return rows[:k]


class _ReplaySignals:
    def __init__(self, replay: FeatureReplay) -> None:
        self.replay = replay
        self._cache: dict[str | None, list[tuple[str, float]]] = {}

    def neighbours(self, item_ids: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
        return [[] for _ in item_ids]

    def trending(self, region: str | None, k: int) -> list[tuple[str, float]]:
        if region not in self._cache:
            self._cache[region] = self.replay.trending(region, 500)
        return self._cache[region][:k]

    def invalidate(self) -> None:
        self._cache.clear()


@dataclass
class RankingData:
    rows: np.ndarray
    labels: np.ndarray
    groups: np.ndarray  # request index of each row
    light_positions: np.ndarray  # the positive's position in the light order, per request


def build_ranking_data(settings: Settings, model: Any, events: Sequence[InteractionEvent],
                       items: Sequence[ItemRecord], users: Mapping[str, UserProfile], *, start_fraction: float = 0.5,
                       max_requests: int = 3000, seed: int = 7) -> RankingData:
    """Replay ``events`` (time order); sample requests from ``start_fraction`` on; light-ranked shortlists."""
    from serving.candidates.backends import MemoryItemIndex
    from serving.candidates.generator import CandidateGenerator

    active = [i for i in items if model.knows(i.item_id)] or list(items)
    vectors = model.encode_items(active)
    index = MemoryItemIndex(active, vectors, [False] * len(active))
    replay = FeatureReplay(settings, items, users)
    signals = _ReplaySignals(replay)
    generator = CandidateGenerator(settings.retrieval, lambda: model, index, signals)
    weights = settings.recommend.source_weights
    keep = settings.recommend.light_keep
    first = int(len(events) * start_fraction)
    positives = [k for k in range(first, len(events)) if events[k].interaction_type.value in ("like", "watch", "click", "view")]
    rng = random.Random(seed)
    chosen = set(rng.sample(positives, min(max_requests, len(positives))))
    rows: list[list[float]] = []
    labels: list[float] = []
    groups: list[int] = []
    light_positions: list[int] = []
    for k, event in enumerate(events):
        if k in chosen:
            ctx = replay.context(event.user_id, "homepage", event.timestamp.timestamp())
            ctx.limit = 10
            if event.item_id not in ctx.consumed:
                candidates = generator.generate_sync(ctx)
                docs = replay.item_documents([c.item_id for c in candidates])
                shortlist = light_rank(candidates, ctx, docs, weights, keep)
                ids = [c.item_id for c in shortlist]
                if event.item_id in ids:
                    group = len(light_positions)
                    light_positions.append(ids.index(event.item_id))
                    rows.extend(ranking_rows(ctx, shortlist, docs))
                    for c in shortlist:
                        labels.append(1.0 if c.item_id == event.item_id else 0.0)
                        groups.append(group)
        replay.apply(event)
        if k % 500 == 0:
            signals.invalidate()
    return RankingData(np.array(rows, dtype=np.float32), np.array(labels, dtype=np.float32),
                       np.array(groups), np.array(light_positions))


def ndcg_at(positions: np.ndarray, k: int = 10) -> float:
    """Mean NDCG@k of one relevant item per request at the given 0-based positions."""
    return float(np.mean([1.0 / math.log2(p + 2) if p < k else 0.0 for p in positions])) if len(positions) else 0.0


def train_ranker(data: RankingData, *, epochs: int = 8, seed: int = 7, hidden: int = 32,
                 holdout: float = 0.2) -> tuple[HeavyRanker, dict[str, float]]:
    """Pointwise BCE on shortlists; returns the ranker and held-out NDCG@10 of light vs heavy order."""
    torch.manual_seed(seed)
    n_groups = int(data.groups.max()) + 1 if len(data.groups) else 0
    if n_groups < 20:
        raise ValueError(f"only {n_groups} replayed requests had their positive in the shortlist; need >= 20")
    cut = int(n_groups * (1 - holdout))
    train_mask = data.groups < cut
    x, y = data.rows[train_mask], data.labels[train_mask]
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    net = RankerNet(data.rows.shape[1], hidden)
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-5)
    xt = torch.from_numpy((x - mean) / std)
    yt = torch.from_numpy(y)
    pos_weight = torch.tensor(float((y == 0).sum()) / max(1.0, float(y.sum())))
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=generator)
        for start in range(0, len(order), 2048):
            batch = order[start:start + 2048]
            optimiser.zero_grad()
            loss = loss_fn(net(xt[batch]), yt[batch])
            loss.backward()
            optimiser.step()
    ranker = HeavyRanker(net, mean, std, {"features": list(FEATURE_NAMES), "hidden": hidden})
    heavy_positions = []
    for group in range(cut, n_groups):
        mask = data.groups == group
        scores = ranker.scores(data.rows[mask])
        label = data.labels[mask]
        heavy_positions.append(int((scores > scores[label == 1][0]).sum()))
    metrics = {
        "requests_train": cut, "requests_holdout": n_groups - cut,
        "holdout_ndcg10_light": round(ndcg_at(data.light_positions[cut:]), 4),
        "holdout_ndcg10_heavy": round(ndcg_at(np.array(heavy_positions)), 4),
        "train_seconds": round(time.perf_counter() - started, 2),
    }
    ranker.meta.update(metrics)
    return ranker, metrics


def train_and_save(settings: Settings, model: Any, events: Sequence[InteractionEvent], items: Sequence[ItemRecord],
                   users: Mapping[str, UserProfile], folder: Path) -> dict[str, float] | None:
    """Train the heavy ranker for a new two-tower version and save it beside it (None if too little data)."""
    cfg = settings.recommend
    data = build_ranking_data(settings, model, sorted(events, key=lambda e: e.timestamp), items, users,
                              max_requests=cfg.ranker_requests)
    try:
        ranker, metrics = train_ranker(data, epochs=cfg.ranker_epochs)
    except ValueError as exc:
        log.warning("ranker_not_trained reason=%s", exc)
        return None
    if metrics["holdout_ndcg10_heavy"] < metrics["holdout_ndcg10_light"]:
        # Ship only a ranker that beats the light order on held-out requests; else the light order stands.
        log.warning("ranker_rejected metrics=%s", metrics)
        return {**metrics, "shipped": 0.0}
    ranker.save(folder)
    metrics["shipped"] = 1.0
    log.info("ranker_trained folder=%s metrics=%s", folder, metrics)
    return metrics


class LiveRanker:
    """The heavy ranker of the live model version; without one, the light order stands.

    ``live_model`` (model.registry.LiveModel) loads it with each version
    (``load_ranker=HeavyRanker.load``), in the background on the serving path.
    """

    def __init__(self, live_model: Any) -> None:
        self.live_model = live_model

    def current(self) -> HeavyRanker | None:
        self.live_model()  # checks the registry at most every reload interval
        return self.live_model.ranker  # type: ignore[no-any-return]

    def rank(self, ctx: UserContext, candidates: list[Candidate], items: Mapping[str, Mapping[str, Any]]) -> list[Candidate]:
        ranker = self.current()
        return ranker.rank(ctx, candidates, items) if ranker is not None else candidates
