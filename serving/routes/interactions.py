"""POST /interactions: validate, produce to Kafka keyed by user_id, answer 202 once acknowledged."""

from __future__ import annotations

from fastapi import APIRouter, status

from schemas.api import AcceptedResponse, ErrorResponse, InteractionBatch
from schemas.events import InteractionEvent
from schemas.topics import Topics
from serving.deps import PublisherDep, RecommenderDep, SettingsDep
from serving.errors import PayloadTooLarge, ServiceUnavailable
from serving.publisher import BrokerUnavailable

router = APIRouter(prefix="/interactions", tags=["interactions"])

_ERRORS: dict[int | str, dict[str, object]] = {
    413: {"model": ErrorResponse, "description": "Batch or body too large"},
    422: {"model": ErrorResponse, "description": "Invalid event; the message names the field"},
    503: {"model": ErrorResponse, "description": "Broker unreachable; nothing was accepted, retry after Retry-After"},
}


async def _accept(events: list[InteractionEvent], publisher: PublisherDep, settings: SettingsDep,
                  recommender: RecommenderDep) -> AcceptedResponse:
    topic = settings.topic(Topics.INTERACTIONS)
    try:
        await publisher.publish_many(topic, [(e.user_id, e.to_json()) for e in events])
    except BrokerUnavailable as exc:
        raise ServiceUnavailable(f"event log unavailable, nothing was accepted: {exc}") from exc
    # Best-effort and off the response path: the users' cached lists turn stale, so their
    # next request revalidates even if the precompute flow is behind. The event is already
    # safe in the log.
    recommender.mark_dirty_soon({e.user_id for e in events})
    return AcceptedResponse(accepted=len(events), event_ids=[e.event_id for e in events])


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=AcceptedResponse, responses=_ERRORS)
async def post_interaction(event: InteractionEvent, publisher: PublisherDep, settings: SettingsDep,
                           recommender: RecommenderDep) -> AcceptedResponse:
    """Log one interaction. 202 means the event is durably in the log."""
    return await _accept([event], publisher, settings, recommender)


@router.post("/batch", status_code=status.HTTP_202_ACCEPTED, response_model=AcceptedResponse, responses=_ERRORS)
async def post_interactions_batch(batch: InteractionBatch, publisher: PublisherDep, settings: SettingsDep,
                                  recommender: RecommenderDep) -> AcceptedResponse:
    """Log up to ``api.max_batch_events`` interactions at once; all or nothing is acknowledged."""
    limit = settings.api.max_batch_events
    if len(batch.events) > limit:
        raise PayloadTooLarge(f"batch has {len(batch.events)} events; the limit is {limit}")
    if not batch.events:
        return AcceptedResponse(accepted=0, event_ids=[])
    return await _accept(batch.events, publisher, settings, recommender)
