"""Policy re-ranking: business rules applied to the ranked list, configured in serving/policies.yaml.

In: ranked candidates (best first), the user context, item features
(status, regions, maturity_rating, category, published_at, clicks, impressions).
Out: the final page of ``ctx.limit`` items. Each rule is best-effort: one that
raises is logged and skipped and the list still goes out. Every rule that moves
or admits an item adds ``rule:<name>`` to its reasons.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field

from serving.pipeline.types import Candidate, UserContext

log = logging.getLogger(__name__)

RATING_ORDER = ["G", "PG", "PG-13", "R", "NC-17"]
DEFAULT_PATH = Path(__file__).resolve().parent.parent / "policies.yaml"


class Filters(BaseModel):
    status: bool = True
    region: bool = True
    consumed: bool = True
    skipped: bool = True
    blocked_items: list[str] = Field(default_factory=list)


class Maturity(BaseModel):
    enabled: bool = True
    max_rating_by_age: dict[str, str] = Field(default_factory=lambda: {"<18": "PG-13"})
    unknown_age_max: str = "PG-13"
    unrated_as: str = "PG"


class Diversity(BaseModel):
    max_per_category: int = Field(default=4, ge=1)


class Freshness(BaseModel):
    weight: float = 0.05
    half_life_days: float = Field(default=30.0, gt=0)


class Exposure(BaseModel):
    per_user_item: int = Field(default=3, ge=1)
    per_item: int = Field(default=1_000_000, ge=1)


class Exploration(BaseModel):
    enabled: bool = True
    positions: list[int] = Field(default_factory=lambda: [8, 9])
    prior_alpha: float = Field(default=1.0, gt=0)
    prior_beta: float = Field(default=20.0, gt=0)
    min_impressions: int = 50
    new_item_share: float = Field(default=0.5, ge=0, le=1)


class Placement(BaseModel):
    item_id: str
    position: int = Field(ge=0)
    surfaces: list[str] = Field(default_factory=lambda: ["homepage"])
    label: str = "pinned"


class PolicyConfig(BaseModel):
    filters: Filters = Field(default_factory=Filters)
    maturity: Maturity = Field(default_factory=Maturity)
    diversity: Diversity = Field(default_factory=Diversity)
    freshness: Freshness = Field(default_factory=Freshness)
    exposure: Exposure = Field(default_factory=Exposure)
    exploration: Exploration = Field(default_factory=Exploration)
    pinned: list[Placement] = Field(default_factory=list)
    sponsored: list[Placement] = Field(default_factory=list)

    @classmethod
    def load(cls, path: Path | str | None = None) -> PolicyConfig:
        """Read and validate the YAML file (errors name the bad field)."""
        return cls.model_validate(yaml.safe_load(Path(path or DEFAULT_PATH).read_text()) or {})


_RATING_RANK = {rating: rank for rank, rating in enumerate(RATING_ORDER)}


def rating_rank(rating: str | None, unrated_as: str) -> int:
    """Position in RATING_ORDER (unrated counts as ``unrated_as``, an unknown rating as the strictest)."""
    return _RATING_RANK.get(rating or unrated_as, len(RATING_ORDER))


def published_epoch(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, datetime):
        return value.timestamp()
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class PolicyEngine:
    """Applies the configured rules in a fixed order; see serving/policies.yaml."""

    def __init__(self, config: PolicyConfig, seed: int | None = None) -> None:
        self.config = config
        self._rng = random.Random(seed)
        # The configuration does not change while the engine lives: what every request reads is derived once.
        self._blocked = frozenset(config.filters.blocked_items)
        self._placements = sorted((*config.pinned, *config.sponsored), key=lambda p: p.position)
        self.placement_ids = [p.item_id for p in (*config.pinned, *config.sponsored)]

    # -- the hard filters: also used on fallback paths -------------------------------
    def allowed(self, item_id: str, item: Mapping[str, Any] | None, ctx: UserContext) -> str | None:
        """None if the item may be shown to this user, else the name of the filter that drops it."""
        return self.checker(ctx)(item_id, item)

    def checker(self, ctx: UserContext) -> Callable[[str, Mapping[str, Any] | None], str | None]:
        """:meth:`allowed` for one user, for checking many items (what depends on the user is worked out once)."""
        f, m = self.config.filters, self.config.maturity
        blocked, current = self._blocked, ctx.current_item_id
        consumed = ctx.consumed if f.consumed else ()
        skipped = ctx.skipped if f.skipped else ()
        check_status, check_region, region = f.status, f.region, ctx.region
        limit = (m.max_rating_by_age.get(ctx.age_bucket) if ctx.age_bucket else m.unknown_age_max) \
            if m.enabled else None
        max_rank = rating_rank(limit, m.unrated_as) if limit is not None else None
        unrated_rank = rating_rank(None, m.unrated_as)
        ranks = _RATING_RANK

        def allowed(item_id: str, item: Mapping[str, Any] | None) -> str | None:
            if item_id in blocked:
                return "blocked"
            if item_id == current:
                return "current_item"
            if item_id in consumed:
                return "consumed"
            if item_id in skipped:
                return "skipped"
            if item is None:
                # Unknown to the catalog: we cannot prove status, region or maturity: do not show it.
                return "unknown_item"
            if check_status and (item.get("status") or "active") != "active":
                return "status"
            # A region-restricted item needs a known region in its list (unknown region: not shown).
            if check_region and (regions := item.get("regions")) and region not in regions:
                return "region"
            if max_rank is not None:
                rating = item.get("maturity_rating")
                if (ranks.get(rating, len(RATING_ORDER)) if rating else unrated_rank) > max_rank:
                    return "maturity"
            return None

        return allowed

    def filter(self, candidates: list[Candidate], items: Mapping[str, Mapping[str, Any]], ctx: UserContext,
               exposure: Mapping[str, int] | None = None, item_exposure: Mapping[str, int] | None = None) -> list[Candidate]:
        """Drop what may not be shown, including items over their daily exposure caps."""
        cap = self.config.exposure
        allowed = self.checker(ctx)
        kept = []
        for candidate in candidates:
            if allowed(candidate.item_id, items.get(candidate.item_id)) is not None:
                continue
            if exposure and exposure.get(candidate.item_id, 0) >= cap.per_user_item:
                continue
            if item_exposure and item_exposure.get(candidate.item_id, 0) >= cap.per_item:
                continue
            kept.append(candidate)
        return kept

    # -- the whole re-rank --------------------------------------------------------------
    def rerank(self, ranked: list[Candidate], items: Mapping[str, Mapping[str, Any]], ctx: UserContext,
               exposure: Mapping[str, int] | None = None, item_exposure: Mapping[str, int] | None = None) -> list[Candidate]:
        """Ranked candidates in, the final page out (at most ctx.limit items)."""
        page = self.filter(ranked, items, ctx, exposure, item_exposure)
        steps: list[tuple[str, Callable[[list[Candidate]], list[Candidate]]]] = [
            ("freshness", lambda c: self._freshness(c, items, ctx)),
            ("diversity", lambda c: self._diversity(c, items, ctx.limit)),
            ("exploration", lambda c: self._exploration(c, items, ctx.limit)),
            ("placements", lambda c: self.place(c, items, ctx)),
        ]
        for name, step in steps:
            try:
                page = step(page)
            except Exception:  # noqa: BLE001 (best-effort by design)
                log.exception("policy_rule_failed rule=%s user_id=%s", name, ctx.user_id)
        return page[: ctx.limit]

    def _freshness(self, candidates: list[Candidate], items: Mapping[str, Mapping[str, Any]], ctx: UserContext) -> list[Candidate]:
        cfg = self.config.freshness
        if cfg.weight <= 0:
            return candidates
        now = ctx.now.timestamp()
        for candidate in candidates:
            published = published_epoch((items.get(candidate.item_id) or {}).get("published_at"))
            if published is None:
                continue
            age_days = max(0.0, (now - published) / 86400)
            boost = cfg.weight * math.pow(0.5, age_days / cfg.half_life_days)
            if boost > 1e-3 * cfg.weight:
                candidate.score += boost
                candidate.reasons.append("rule:freshness")
        return sorted(candidates, key=lambda c: -c.score)

    def _diversity(self, candidates: list[Candidate], items: Mapping[str, Mapping[str, Any]], limit: int) -> list[Candidate]:
        """Greedy per-category cap on the page; overflow items move below the page."""
        cap = self.config.diversity.max_per_category
        page: list[Candidate] = []
        overflow: list[Candidate] = []
        counts: dict[str, int] = {}
        for candidate in candidates:
            category = (items.get(candidate.item_id) or {}).get("category") or "?"
            if len(page) < limit and counts.get(category, 0) >= cap:
                candidate.reasons.append("rule:diversity")
                overflow.append(candidate)
                continue
            counts[category] = counts.get(category, 0) + 1
            page.append(candidate)
        head, tail = page[:limit], page[limit:]
        if len(head) < limit:  # not enough variety: fill the page back up in rank order
            head += overflow[: limit - len(head)]
            overflow = overflow[limit - len(head):]
        return head + overflow + tail

    def _exploration(self, candidates: list[Candidate], items: Mapping[str, Mapping[str, Any]], limit: int) -> list[Candidate]:
        """Fill the lower exploration slots by Thompson sampling among candidates below the page."""
        cfg = self.config.exploration
        positions = sorted(p for p in cfg.positions if p < min(limit, len(candidates)))
        pool = candidates[limit:]
        if not cfg.enabled or not positions or not pool:
            return candidates
        new_budget = max(1, int(len(positions) * cfg.new_item_share))
        draws = []
        for candidate in pool:
            item = items.get(candidate.item_id) or {}
            impressions = float(item.get("impressions") or 0)
            clicks = min(float(item.get("clicks") or 0), impressions)
            sample = self._rng.betavariate(cfg.prior_alpha + clicks, cfg.prior_beta + impressions - clicks)
            draws.append((sample, impressions < cfg.min_impressions, candidate))
        draws.sort(key=lambda d: -d[0])
        chosen: list[Candidate] = []
        for _, is_new, candidate in draws:
            if len(chosen) == len(positions):
                break
            if is_new:
                if new_budget == 0:
                    continue
                new_budget -= 1
            chosen.append(candidate)
        page = [c for c in candidates[:limit]]
        displaced = []
        for position, candidate in zip(positions, chosen, strict=False):
            candidate.reasons.append("rule:exploration")
            displaced.append(page[position])
            page[position] = candidate
        chosen_ids = {c.item_id for c in chosen}
        rest = [c for c in candidates[limit:] if c.item_id not in chosen_ids]
        return page + displaced + rest

    def place(self, candidates: list[Candidate], items: Mapping[str, Mapping[str, Any]], ctx: UserContext) -> list[Candidate]:
        """Pinned and sponsored items at fixed positions, if they pass the hard filters (every path)."""
        placements = [p for p in self._placements if ctx.surface in p.surfaces]
        if not placements:
            return candidates
        page = list(candidates)
        allowed = self.checker(ctx)
        for placement in placements:
            if allowed(placement.item_id, items.get(placement.item_id)) is not None:
                continue
            existing = next((c for c in page if c.item_id == placement.item_id), None)
            if existing is not None:
                page.remove(existing)
            candidate = existing or Candidate(item_id=placement.item_id, sources={placement.label: 1.0})
            candidate.reasons.append(f"rule:{placement.label}")
            page.insert(min(placement.position, len(page)), candidate)
        return page
