"""Offline quality on the Microsoft Recommenders MovieLens-100K protocol, beside their published table.

    python -m bench.offline [--seed 42]

In: MovieLens-100K (demo.movielens). Out: bench/results/offline.json (and a PNG
via bench.plots): precision@10, recall@10, NDCG@10 and MAP for most-popular,
item-kNN, EASE and our two-tower model, next to the published figures.

Protocol (as in Recommenders' benchmark notebook): every rating is an
interaction; a stratified per-user random split puts 75% of each user's
ratings in train and 25% in test (seeded; our implementation of
``python_stratified_split``, so the exact rows differ from theirs); each user
with test items gets a top-10 list over the whole catalogue with their train
items removed; metrics use binary relevance and are averaged over those users.
The two-tower is trained on the train part only (in time order, as the
trainer replays the log) and ranks the whole catalogue by the user tower's
vector built from the user's train history and profile (exact search, no ANN).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from bench import baselines, metrics
from bench._common import save
from demo.movielens import MovieLens, load_movielens
from schemas.events import InteractionEvent

K = 10
# Published: https://github.com/recommenders-team/recommenders README.md, "Benchmarks" table
# ("results on Movielens 100k, running the algorithms for 15 epochs"; top-k = 10,
# stratified 75/25 split). MAP there is Recommenders' map_at_k (AP divided by |test items|).
PUBLISHED: dict[str, dict[str, float]] = {
    "BPR (cornac)": {"map": 0.132478, "ndcg@10": 0.441997, "precision@10": 0.388229, "recall@10": 0.212522},
    "BiVAE (cornac)": {"map": 0.146126, "ndcg@10": 0.475077, "precision@10": 0.411771, "recall@10": 0.219145},
    "LightGCN": {"map": 0.088526, "ndcg@10": 0.419846, "precision@10": 0.379626, "recall@10": 0.144336},
    "NCF": {"map": 0.107720, "ndcg@10": 0.396118, "precision@10": 0.347296, "recall@10": 0.180775},
    "SAR": {"map": 0.110591, "ndcg@10": 0.382461, "precision@10": 0.330753, "recall@10": 0.176385},
}
PUBLISHED_SOURCE = "https://github.com/recommenders-team/recommenders#benchmarks (README, MovieLens 100k table)"


def stratified_split(events: Sequence[InteractionEvent], ratio: float = 0.75, seed: int = 42
                     ) -> tuple[list[InteractionEvent], list[InteractionEvent]]:
    """Per user: a seeded random ``ratio`` of their events to train, the rest to test."""
    rng = np.random.default_rng(seed)
    by_user: dict[str, list[InteractionEvent]] = defaultdict(list)
    for event in events:
        by_user[event.user_id].append(event)
    train, test = [], []
    for user_id in sorted(by_user, key=lambda u: (len(u), u)):
        rows = by_user[user_id]
        order = rng.permutation(len(rows))
        cut = int(round(ratio * len(rows)))
        train += [rows[i] for i in order[:cut]]
        test += [rows[i] for i in order[cut:]]
    train.sort(key=lambda e: (e.timestamp, e.user_id, e.item_id))
    return train, test


def evaluate_lists(lists: Mapping[str, Sequence[str]], truth: Mapping[str, set[str]], k: int = K) -> dict[str, float]:
    users = [u for u in truth if truth[u]]
    return {
        "map": metrics.mean([metrics.average_precision_at_k(lists.get(u, []), truth[u], k) for u in users]),
        "ndcg@10": metrics.mean([metrics.ndcg_set_at_k(lists.get(u, []), truth[u], k) for u in users]),
        "precision@10": metrics.mean([metrics.precision_at_k(lists.get(u, []), truth[u], k) for u in users]),
        "recall@10": metrics.mean([metrics.recall_at_k(lists.get(u, []), truth[u], k) for u in users]),
        "users": float(len(users)),
    }


def matrix_lists(data: MovieLens, train: Sequence[InteractionEvent], users: Sequence[str],
                 fit: Callable[[np.ndarray], np.ndarray]) -> dict[str, list[str]]:
    item_ids = [i.item_id for i in data.items]
    item_pos = {item_id: n for n, item_id in enumerate(item_ids)}
    user_pos = {u.user_id: n for n, u in enumerate(data.users)}
    matrix = np.zeros((len(user_pos), len(item_ids)), dtype=np.float32)
    for event in train:
        matrix[user_pos[event.user_id], item_pos[event.item_id]] = 1.0
    weights = fit(matrix)
    rows = [user_pos[u] for u in users]
    out: dict[str, list[str]] = {}
    for start in range(0, len(rows), 256):
        chunk = rows[start:start + 256]
        for user, top in zip(users[start:start + 256], baselines.top_k(matrix, chunk, weights, K), strict=True):
            out[user] = [item_ids[i] for i in top]
    return out


def two_tower_lists(data: MovieLens, train: Sequence[InteractionEvent], users: Sequence[str]
                    ) -> tuple[dict[str, list[str]], dict[str, Any]]:
    from model.train import train_two_tower
    from serving.config import load_settings

    profiles = {u.user_id: u for u in data.users}
    model = train_two_tower(train, data.items, profiles, load_settings().model, version="bench_offline")
    vectors = model.encode_items(data.items)
    item_ids = [i.item_id for i in data.items]
    history: dict[str, list[str]] = defaultdict(list)
    for event in train:  # time order: newest last
        history[event.user_id].append(event.item_id)
    out: dict[str, list[str]] = {}
    for start in range(0, len(users), 256):
        chunk = users[start:start + 256]
        hist = [model.history_row(reversed(history[u])) for u in chunk]
        prof = [model.profile_row(profiles[u].region, profiles[u].language, profiles[u].age_bucket, None)
                for u in chunk]
        scores = model.encode_histories(hist, prof) @ vectors.T
        for row, user in zip(scores, chunk, strict=True):
            seen = set(history[user])
            order = np.argsort(-row, kind="stable")
            out[user] = [item_ids[i] for i in order if item_ids[i] not in seen][:K]
    return out, {k: v for k, v in model.meta.items() if isinstance(v, int | float)}


def run(seed: int = 42) -> dict[str, Any]:
    data = load_movielens()
    train, test = stratified_split(data.interactions, 0.75, seed)
    truth: dict[str, set[str]] = defaultdict(set)
    for event in test:
        truth[event.user_id].add(event.item_id)
    users = sorted(truth)
    algorithms: list[tuple[str, Callable[[], dict[str, list[str]]]]] = [
        ("most-popular", lambda: matrix_lists(data, train, users, baselines.most_popular_weights)),
        ("item-kNN", lambda: matrix_lists(data, train, users, baselines.item_knn_weights)),
        ("EASE", lambda: matrix_lists(data, train, users, baselines.ease_weights)),
    ]
    results: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    bar = tqdm(total=len(algorithms) + 1, desc="offline", unit="algo")
    for name, make in algorithms:
        t0 = time.perf_counter()
        results[name] = {**evaluate_lists(make(), truth), "seconds": round(time.perf_counter() - t0, 2)}
        bar.update(1)
    t0 = time.perf_counter()
    lists, extra["two_tower_training"] = two_tower_lists(data, train, users)
    results["two-tower (ours)"] = {**evaluate_lists(lists, truth), "seconds": round(time.perf_counter() - t0, 2)}
    bar.update(1)
    bar.close()
    return {
        "protocol": "Microsoft Recommenders MovieLens-100K: stratified per-user random 75/25 split "
                    f"(seed {seed}), top-{K} over the catalogue excluding train items, binary relevance",
        "train_events": len(train), "test_events": len(test), "test_users": len(users),
        "ours": results, "published": PUBLISHED, "published_source": PUBLISHED_SOURCE, **extra,
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"{'algorithm':22} {'P@10':>7} {'R@10':>7} {'NDCG@10':>8} {'MAP':>7}")
    for label, rows in (("", result["ours"]), (" (published)", result["published"])):
        for name, r in rows.items():
            print(f"{name + label:22} {r['precision@10']:7.4f} {r['recall@10']:7.4f} {r['ndcg@10']:8.4f} {r['map']:7.4f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    result = run(args.seed)
    print_table(result)
    result["load_average_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    save("offline", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
