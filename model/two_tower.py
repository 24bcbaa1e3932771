"""The two towers and the encoder the serving side uses.

In: item content (``ItemRecord``) and a user's recent interactions plus profile
(``UserContext``). Out: L2-normalised float32 vectors of ``dim`` dimensions
whose dot product scores a (user, item) pair.

The item tower sums an item-id embedding and hashed content tokens (category,
tags, language, year, title words, creator, maturity), so a brand-new item,
whose id the model never saw, still gets a vector from its content alone. The
user tower pools learned embeddings of the recently interacted items (most
recent weighted highest) with the profile (region, language, age, device), so
a user's vector follows their latest clicks without retraining.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from schemas.catalog import ItemRecord
from serving.pipeline.types import UserContext

# Interactions that say nothing positive about the item: never history, never a target.
NEGATIVE_TYPES = frozenset({"skip", "impression"})
MAX_CONTENT_TOKENS = 32
PROFILE_BUCKETS = 1024
_WORD = re.compile(r"[a-z0-9]+")
# Recency weight of the i-th most recent history item: 0.92**i (half weight after ~8 items).
HISTORY_DECAY = 0.92


def stable_hash(token: str, buckets: int) -> int:
    """Bucket 1..buckets for a token, stable across processes (0 is padding)."""
    return zlib.crc32(token.encode()) % buckets + 1


def content_tokens(item: ItemRecord) -> list[str]:
    """The content an item's vector is built from; no behaviour, so it exists at creation."""
    tokens = [f"type:{item.type}"]
    if item.category:
        tokens.append(f"cat:{item.category.lower()}")
    tokens += [f"tag:{tag.lower()}" for tag in item.tags]
    if item.language:
        tokens.append(f"lang:{item.language.lower()}")
    if item.published_at is not None:
        year = item.published_at.year
        tokens += [f"year:{year}", f"decade:{year // 10}"]
    if item.creator_id:
        tokens.append(f"creator:{item.creator_id}")
    if item.maturity_rating:
        tokens.append(f"mat:{item.maturity_rating}")
    if item.title:
        # Years in titles ("Heat (1995)") are already a token of their own.
        tokens += [f"w:{word}" for word in _WORD.findall(item.title.lower()) if not word.isdigit()][:16]
    return tokens[:MAX_CONTENT_TOKENS]


def profile_tokens(region: str | None, language: str | None, age_bucket: str | None,
                   device: str | None) -> list[str]:
    tokens = ["bias"]
    for name, value in (("region", region), ("lang", language), ("age", age_bucket), ("device", device)):
        if value:
            tokens.append(f"{name}:{str(value).lower()}")
    return tokens


@dataclass(frozen=True)
class TowerConfig:
    n_items: int  # known item ids (index 0 is "unknown")
    dim: int = 64
    content_buckets: int = 1 << 14
    history_len: int = 50
    hidden: int = 128


class ItemTower(nn.Module):
    def __init__(self, config: TowerConfig) -> None:
        super().__init__()
        self.ids = nn.Embedding(config.n_items + 1, config.dim, padding_idx=0)
        self.content = nn.Embedding(config.content_buckets + 1, config.dim, padding_idx=0)
        self.mlp = nn.Sequential(nn.Linear(2 * config.dim, config.hidden), nn.ReLU(),
                                 nn.Linear(config.hidden, config.dim))

    def forward(self, ids: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
        mask = (content > 0).float().unsqueeze(-1)
        pooled = (self.content(content) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        out = self.mlp(torch.cat([self.ids(ids), pooled], dim=-1))
        return nn.functional.normalize(out, dim=-1)


class UserTower(nn.Module):
    def __init__(self, config: TowerConfig) -> None:
        super().__init__()
        self.history = nn.Embedding(config.n_items + 1, config.dim, padding_idx=0)
        self.profile = nn.Embedding(PROFILE_BUCKETS + 1, config.dim, padding_idx=0)
        self.mlp = nn.Sequential(nn.Linear(2 * config.dim, config.hidden), nn.ReLU(),
                                 nn.Linear(config.hidden, config.dim))
        decay = torch.tensor([HISTORY_DECAY**i for i in range(config.history_len)])
        self.register_buffer("decay", decay, persistent=False)

    def forward(self, history: torch.Tensor, profile: torch.Tensor) -> torch.Tensor:
        weights = ((history > 0).float() * self.decay[: history.shape[1]]).unsqueeze(-1)
        pooled = (self.history(history) * weights).sum(1) / weights.sum(1).clamp(min=1e-6)
        pmask = (profile > 0).float().unsqueeze(-1)
        prof = (self.profile(profile) * pmask).sum(1) / pmask.sum(1).clamp(min=1.0)
        out = self.mlp(torch.cat([pooled, prof], dim=-1))
        return nn.functional.normalize(out, dim=-1)


class TwoTower(nn.Module):
    def __init__(self, config: TowerConfig) -> None:
        super().__init__()
        self.config = config
        self.items = ItemTower(config)
        self.users = UserTower(config)


class TwoTowerModel:
    """A trained two-tower with its id maps: what the API and the flows load (CPU, no grad)."""

    WEIGHTS = "weights.pt"
    META = "meta.json"

    def __init__(self, net: TwoTower, item_ids: Sequence[str], version: str = "untrained",
                 meta: dict | None = None) -> None:
        self.net = net.eval()
        self.config = net.config
        self.version = version
        self.item_ids = list(item_ids)
        self.item_index = {item_id: i + 1 for i, item_id in enumerate(self.item_ids)}
        self.meta = meta or {}

    @property
    def dim(self) -> int:
        return self.config.dim

    def knows(self, item_id: str) -> bool:
        """True if the item was in the training log (else its vector is content-only)."""
        return item_id in self.item_index

    # -- feature tensors --------------------------------------------------------
    def item_tensors(self, items: Sequence[ItemRecord]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.tensor([self.item_index.get(item.item_id, 0) for item in items], dtype=torch.long)
        content = torch.zeros((len(items), MAX_CONTENT_TOKENS), dtype=torch.long)
        for row, item in enumerate(items):
            tokens = [stable_hash(t, self.config.content_buckets) for t in content_tokens(item)]
            content[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        return ids, content

    def history_row(self, recent_item_ids: Iterable[str]) -> list[int]:
        """Known item indexes, most recent first, at most history_len."""
        row: list[int] = []
        for item_id in recent_item_ids:
            index = self.item_index.get(item_id)
            if index:
                row.append(index)
                if len(row) == self.config.history_len:
                    break
        return row

    @staticmethod
    def profile_row(region: str | None, language: str | None, age_bucket: str | None,
                    device: str | None) -> list[int]:
        return [stable_hash(t, PROFILE_BUCKETS) for t in profile_tokens(region, language, age_bucket, device)]

    # -- encoding ---------------------------------------------------------------
    def encode_items(self, items: Sequence[ItemRecord], batch_size: int = 4096) -> np.ndarray:
        """(n, dim) float32 unit vectors for items (unknown ids: from content alone)."""
        out = np.zeros((len(items), self.dim), dtype=np.float32)
        with torch.no_grad():
            for start in range(0, len(items), batch_size):
                ids, content = self.item_tensors(items[start : start + batch_size])
                out[start : start + len(ids)] = self.net.items(ids, content).numpy()
        return out

    def encode_histories(self, histories: Sequence[Sequence[int]], profiles: Sequence[Sequence[int]]) -> np.ndarray:
        """Batch user vectors from index rows (history_row / profile_row)."""
        width = max(1, max((len(h) for h in histories), default=1))
        hist = torch.zeros((len(histories), width), dtype=torch.long)
        prof = torch.zeros((len(profiles), 6), dtype=torch.long)
        for row, (h, p) in enumerate(zip(histories, profiles, strict=True)):
            if h:
                hist[row, : len(h)] = torch.tensor(h, dtype=torch.long)
            prof[row, : len(p)] = torch.tensor(p, dtype=torch.long)
        with torch.no_grad():
            return self.net.users(hist, prof).numpy()

    def encode_user(self, ctx: UserContext) -> np.ndarray:
        """(dim,) float32 unit vector from the request's recent history and profile."""
        history = self.history_row(i for i, kind, _ in ctx.recent if kind not in NEGATIVE_TYPES)
        profile = self.profile_row(ctx.region, ctx.language, ctx.age_bucket, ctx.device)
        return self.encode_histories([history], [profile])[0]

    # -- persistence ----------------------------------------------------------------
    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.net.state_dict(), folder / self.WEIGHTS)
        meta = {**self.meta, "version": self.version, "config": asdict(self.config), "item_ids": self.item_ids}
        (folder / self.META).write_text(json.dumps(meta))

    @classmethod
    def load(cls, folder: Path) -> TwoTowerModel:
        meta = json.loads((Path(folder) / cls.META).read_text())
        net = TwoTower(TowerConfig(**meta["config"]))
        net.load_state_dict(torch.load(Path(folder) / cls.WEIGHTS, weights_only=True))
        item_ids = meta.pop("item_ids")
        return cls(net, item_ids, version=meta["version"], meta=meta)
