"""The two-tower model: content-only vectors for new items, history-following users, determinism."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
import torch

from model.train import ordered_unique, train_two_tower
from model.two_tower import TwoTowerModel
from schemas.catalog import ItemRecord, UserProfile
from schemas.events import InteractionEvent
from serving.config import ModelSettings
from serving.pipeline.types import UserContext

GENRES = ["Action", "Comedy", "Drama", "Horror"]


def synthetic_log(n_users: int = 60, per_user: int = 30, seed: int = 0):
    """Users who each stick to one genre; items have a genre as category and tag."""
    rng = np.random.default_rng(seed)
    items = [ItemRecord(item_id=f"i{g}{k}", title=f"{genre} film {k}", category=genre, tags=[genre], language="en")
             for g, genre in enumerate(GENRES) for k in range(25)]
    users = {f"u{u}": UserProfile(user_id=f"u{u}", region="eu", language="en") for u in range(n_users)}
    start = datetime(2024, 1, 1, tzinfo=UTC)
    events = []
    for u in range(n_users):
        genre = u % len(GENRES)
        for step in range(per_user):
            events.append(InteractionEvent(
                event_id=f"e{u}-{step}", user_id=f"u{u}", item_id=f"i{genre}{rng.integers(25)}",
                interaction_type="watch", timestamp=start + timedelta(minutes=u * 100 + step)))
    return items, users, events


@pytest.fixture(scope="module")
def trained() -> tuple[TwoTowerModel, list[ItemRecord]]:
    items, users, events = synthetic_log()
    config = ModelSettings(epochs=8, batch_size=256, dim=16, history_len=10)
    return train_two_tower(events, items, users, config, version="vtest"), items


def test_user_vector_follows_recent_clicks_without_retraining(trained) -> None:
    model, items = trained
    vectors = model.encode_items(items)
    category = np.array([i.category for i in items])
    for genre in ("Action", "Horror"):
        recent = [(i.item_id, "click", 0.0) for i in items if i.category == genre][:5]
        user = model.encode_user(UserContext(user_id="new", recent=recent, region="eu"))
        top = np.argsort(-(vectors @ user))[:20]
        assert (category[top] == genre).mean() >= 0.8, genre


def test_new_item_gets_a_vector_from_content_alone(trained) -> None:
    model, items = trained
    new = ItemRecord(item_id="brand-new", title="Comedy film 99", category="Comedy", tags=["Comedy"], language="en")
    assert not model.knows("brand-new")
    vector = model.encode_items([new])[0]
    vectors = model.encode_items(items)
    similar = [items[j].category for j in np.argsort(-(vectors @ vector))[:10]]
    assert similar.count("Comedy") >= 7
    assert np.isclose(np.linalg.norm(vector), 1.0, atol=1e-5)


def test_training_is_deterministic() -> None:
    items, users, events = synthetic_log(n_users=20, per_user=10)
    config = ModelSettings(epochs=2, batch_size=64, dim=8, history_len=5)
    a = train_two_tower(events, items, users, config)
    b = train_two_tower(list(reversed(events)), items, users, config)  # order of the log does not matter
    for (name, wa), (_, wb) in zip(a.net.state_dict().items(), b.net.state_dict().items(), strict=True):
        assert torch.equal(wa, wb), name


def test_replayed_events_count_once() -> None:
    _, _, events = synthetic_log(n_users=2, per_user=3)
    assert len(ordered_unique(events + events[:4])) == len(events)


def test_save_and_load_give_the_same_vectors(trained, tmp_path) -> None:
    model, items = trained
    model.save(tmp_path / "m")
    loaded = TwoTowerModel.load(tmp_path / "m")
    assert loaded.version == "vtest" and loaded.item_ids == model.item_ids
    np.testing.assert_allclose(loaded.encode_items(items[:5]), model.encode_items(items[:5]), atol=1e-6)
    ctx = UserContext(user_id="u", recent=[("i00", "like", 0.0)], region="eu")
    np.testing.assert_allclose(loaded.encode_user(ctx), model.encode_user(ctx), atol=1e-6)


def skewed_log(n_users: int = 80, per_user: int = 20, seed: int = 1):
    """Genre-loyal users who pick items within their genre with Zipf-like popularity."""
    rng = np.random.default_rng(seed)
    items, users, _ = synthetic_log(n_users=1, per_user=1)
    users = {f"u{u}": UserProfile(user_id=f"u{u}", region="eu", language="en") for u in range(n_users)}
    weights = 1.0 / np.arange(1, 26)
    start = datetime(2024, 1, 1, tzinfo=UTC)
    events = [
        InteractionEvent(event_id=f"e{u}-{step}", user_id=f"u{u}",
                         item_id=f"i{u % len(GENRES)}{rng.choice(25, p=weights / weights.sum())}",
                         interaction_type="watch", timestamp=start + timedelta(minutes=u * 100 + step))
        for u in range(n_users) for step in range(per_user)
    ]
    return items, users, events


def test_popularity_prior_moves_popular_items_up() -> None:
    items, users, events = skewed_log()
    counts = {i.item_id: 0 for i in items}
    for event in events:
        counts[event.item_id] += 1
    log_pop = np.log1p([counts[i.item_id] for i in items])

    def popularity_correlation(prior: float) -> float:
        config = ModelSettings(epochs=6, batch_size=128, dim=16, history_len=10, popularity_prior=prior)
        model = train_two_tower(events, items, users, config)
        vectors = model.encode_items(items)
        user = model.encode_user(UserContext(user_id="new", region="eu"))  # profile only
        return float(np.corrcoef(vectors @ user, log_pop)[0, 1])

    assert popularity_correlation(2.0) > popularity_correlation(0.0) + 0.1
