"""Typed dependencies: clients are built once in the app's lifespan and shared."""

from __future__ import annotations

from typing import Annotated

import redis.asyncio as aioredis
from fastapi import Depends, Request

from serving.config import Settings
from serving.pipeline.service import Recommender
from serving.publisher import EventPublisher


def _settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def _publisher(request: Request) -> EventPublisher:
    return request.app.state.publisher  # type: ignore[no-any-return]


def _recommender(request: Request) -> Recommender:
    return request.app.state.recommender  # type: ignore[no-any-return]


def _redis(request: Request) -> aioredis.Redis:
    return request.app.state.redis  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(_settings)]
PublisherDep = Annotated[EventPublisher, Depends(_publisher)]
RedisDep = Annotated[aioredis.Redis, Depends(_redis)]
RecommenderDep = Annotated[Recommender, Depends(_recommender)]
