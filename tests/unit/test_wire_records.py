"""The wire bytes of records: the cheap serialisations give exactly the bytes of the validated model."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from schemas.api import RecommendationResponse
from schemas.events import Device, ImpressionRecord, InteractionEvent, Surface


@pytest.mark.parametrize(("device", "region"), [(None, None), (Device.mobile, "eu-west")])
def test_impression_wire_json_is_the_validated_records_json(device: Device | None, region: str | None) -> None:
    fields = {"request_id": "req-1", "user_id": "u42", "surface": Surface.up_next,
              "item_ids": ["i1", "i2", "i3"], "scores": [0.9, 0.57, 1e-7], "served_from": "cache_stale",
              "device": device, "region": region, "timestamp": datetime(2026, 11, 25, 12, 0, 1, 5, tzinfo=UTC)}
    expected = ImpressionRecord(**fields).to_json()
    assert ImpressionRecord.wire_json(**fields) == expected
    assert ImpressionRecord.from_json(expected).model_dump() == ImpressionRecord(**fields).model_dump()


def test_to_json_is_compact_json_without_nulls() -> None:
    event = InteractionEvent(event_id="e1", user_id="u1", item_id="i1", interaction_type="watch",
                             timestamp=datetime(2026, 11, 25, 12, 0, tzinfo=UTC), interaction_value=12.5)
    assert event.to_json() == orjson.dumps(event.model_dump(mode="json", exclude_none=True))
    assert b" " not in event.to_json() and b"null" not in event.to_json()


@pytest.mark.parametrize("at", [datetime(2026, 11, 25, 12, 0, 1, 5, tzinfo=UTC), datetime(2026, 11, 25, 12, 0, tzinfo=UTC)])
@pytest.mark.parametrize("items", [[], [("i1", 0.912345, ["source:ann", "rule:freshness_boost"]), ("i2", 1.0, []),
                                        ("i3", 1e-7, ["source:trending"]), ("i4", -0.25, ["pinned"])]])
def test_response_wire_json_is_the_validated_responses_json(items: list[tuple[str, float, list[str]]],
                                                             at: datetime) -> None:
    fields = {"user_id": "u42", "surface": Surface.homepage, "generated_at": at, "request_id": "req-1",
              "served_from": "cache"}
    model = RecommendationResponse.model_validate(
        {**fields, "recommendations": [{"item_id": i, "score": s, "reasons": r} for i, s, r in items]})
    wire = RecommendationResponse.wire_json(items=items, **fields)
    assert wire == model.__pydantic_serializer__.to_json(model) == model.model_dump_json().encode()
    assert RecommendationResponse.model_validate_json(wire) == model


@pytest.mark.parametrize("params", [
    {"user_id": "u1"},
    {"user_id": " u2 ", "surface": "up_next", "limit": "25", "current_item_id": "m7", "device": "tv", "region": "eu-west"},
])
def test_a_query_becomes_the_request_validation_would_make(params: dict[str, str]) -> None:
    from schemas.api import RecommendationQuery, RecommendationRequest

    query = RecommendationQuery.model_validate(params)
    built = query.to_request()
    validated = RecommendationRequest.model_validate({
        "user_id": query.user_id, "surface": query.surface, "limit": query.limit,
        "context": {"current_item_id": query.current_item_id, "device": query.device, "region": query.region}})
    assert built == validated and built.model_dump() == validated.model_dump()
    assert built.to_json() == validated.to_json()
