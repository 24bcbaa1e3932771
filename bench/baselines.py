"""Baseline recommenders for the quality benchmarks: most-popular, item-kNN and EASE.

In: a binary user x item matrix (numpy, float32) of what each user consumed so
far. Out: item weights (``fit``) and top-k item indexes per user (``top_k``),
already-consumed items excluded. Dense numpy is enough at MovieLens-100K scale
(1,682 items: EASE's inverse takes well under a second on one core).

- most-popular: items by how many users consumed them;
- item-kNN: cosine similarity between item columns, pruned to each item's
  ``neighbours`` nearest, a user's score for i = sum of sim(j, i) over their items j;
- EASE (Steck, "Embarrassingly Shallow Autoencoders", WWW 2019): the closed-form
  B = I - P diagMat(1 / diag(P)), P = (X^T X + lambda I)^-1, score = x_u B.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def most_popular_weights(matrix: np.ndarray) -> np.ndarray:
    """Per-item consumer counts (a 1-D score shared by every user)."""
    return matrix.sum(axis=0).astype(np.float32)


def item_knn_weights(matrix: np.ndarray, neighbours: int = 100) -> np.ndarray:
    """Cosine item-item similarity, zero diagonal, each column keeping its ``neighbours`` largest."""
    co = (matrix.T @ matrix).astype(np.float32)
    norms = np.sqrt(np.diag(co)).astype(np.float32)
    norms[norms == 0] = 1.0
    sim = co / norms[:, None] / norms[None, :]
    np.fill_diagonal(sim, 0.0)
    n = sim.shape[0]
    if 0 < neighbours < n:
        # Keep, per target item (column), the most similar source items.
        cut = np.partition(sim, n - neighbours, axis=0)[n - neighbours]
        sim = np.where(sim >= cut[None, :], sim, 0.0).astype(np.float32)
    return sim


def ease_weights(matrix: np.ndarray, l2: float = 250.0) -> np.ndarray:
    """EASE's item-item weight matrix B (zero diagonal)."""
    gram = (matrix.T @ matrix).astype(np.float64)
    gram[np.diag_indices_from(gram)] += l2
    p = np.linalg.inv(gram)
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    return b.astype(np.float32)


def scores(matrix: np.ndarray, users: Sequence[int], weights: np.ndarray) -> np.ndarray:
    """Scores of every item for ``users``: x_u W for a 2-D W, the same 1-D W for everyone."""
    rows = matrix[list(users)]
    if weights.ndim == 1:
        return np.broadcast_to(weights, (len(users), weights.shape[0])).copy()
    return rows @ weights


def top_k(matrix: np.ndarray, users: Sequence[int], weights: np.ndarray, k: int = 10) -> list[list[int]]:
    """Top-k item indexes per user (best first), items the user consumed excluded; ties by index."""
    s = scores(matrix, users, weights).astype(np.float64)
    s[matrix[list(users)] > 0] = -np.inf
    out = []
    for row in s:
        # Stable sort on (-score, index) so equal scores (e.g. popularity ties) are deterministic.
        order = np.lexsort((np.arange(row.shape[0]), -row))[:k]
        out.append([int(i) for i in order if np.isfinite(row[i])])
    return out
