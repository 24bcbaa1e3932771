"""Candidate generation shared by the API and the precompute flow (see generator.py)."""

from __future__ import annotations

from serving.candidates.backends import (
    ItemIndex,
    MemoryItemIndex,
    MemorySignals,
    RedisSignals,
    Signals,
)
from serving.candidates.generator import CandidateGenerator, merge
from serving.config import Settings


def build_candidate_generator(settings: Settings) -> CandidateGenerator:
    """The production wiring: live model from the registry, Milvus alias, Redis signals."""
    from infra.milvus import MilvusItemIndex
    from model.registry import LiveModel

    return CandidateGenerator(settings.retrieval, LiveModel(settings), MilvusItemIndex(settings),
                              RedisSignals(settings))


__all__ = [
    "CandidateGenerator",
    "ItemIndex",
    "MemoryItemIndex",
    "MemorySignals",
    "RedisSignals",
    "Signals",
    "build_candidate_generator",
    "merge",
]
