"""The live model on the serving path: a new version is loaded beside the old one, never on the caller's time."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

import model.registry as registry_module
from model.registry import LiveModel
from schemas.models import ModelVersion
from serving.config import load_settings

LOAD_S = 0.3


class Registry:
    def __init__(self) -> None:
        self.entry = ModelVersion(version="v1", artefacts="/models/v1", status="live")

    def live(self) -> ModelVersion:
        return self.entry


@pytest.fixture
def slow_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    loaded: list[str] = []

    def load(path: Path) -> tuple[str, str]:
        time.sleep(LOAD_S)
        loaded.append(path.name)
        return ("two_tower", path.name)

    monkeypatch.setattr(registry_module.TwoTowerModel, "load", staticmethod(load))
    return loaded


def live_model(background: bool, load_ranker: Any = None) -> tuple[LiveModel, Registry]:
    settings = load_settings(model={"reload_interval_s": 0.0})  # every call is a due check
    registry = Registry()
    return LiveModel(settings, registry=registry, background=background, load_ranker=load_ranker), registry  # type: ignore[arg-type]


def wait_for_version(live: LiveModel, version: str) -> None:
    deadline = time.monotonic() + 5
    while (live.entry is None or live.entry.version != version) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert live.entry is not None and live.entry.version == version


def test_a_due_check_in_the_background_returns_the_loaded_model_at_once(slow_loads: list[str]) -> None:
    live, registry = live_model(background=True, load_ranker=lambda path: ("ranker", path.name))
    assert live.refresh()  # start-up: loaded before the first request
    registry.entry = ModelVersion(version="v2", artefacts="/models/v2", status="live")
    started = time.monotonic()
    during = [live() for _ in range(50)]  # while v2 loads
    assert time.monotonic() - started < LOAD_S / 3
    assert all(m == ("two_tower", "v1") for m in during)
    wait_for_version(live, "v2")
    assert live() == ("two_tower", "v2") and live.ranker == ("ranker", "v2")
    assert slow_loads == ["v1", "v2"]  # one load per version, however many calls were due


def test_a_ranker_that_fails_to_load_leaves_the_new_two_tower_live(slow_loads: list[str]) -> None:
    def broken(path: Path) -> None:
        raise ValueError("corrupt ranker weights")

    live, _ = live_model(background=True, load_ranker=broken)
    assert live.refresh()
    assert live.model == ("two_tower", "v1") and live.ranker is None


def test_without_background_a_due_check_loads_on_the_callers_thread(slow_loads: list[str]) -> None:
    live, _ = live_model(background=False)
    started = time.monotonic()
    assert live() == ("two_tower", "v1")
    assert time.monotonic() - started >= LOAD_S


def test_a_refresh_thread_that_cannot_start_leaves_the_next_check_free_to_try(
        slow_loads: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    live, registry = live_model(background=True)
    assert live.refresh()
    registry.entry = ModelVersion(version="v2", artefacts="/models/v2", status="live")

    def refuse(self: Any) -> None:
        raise RuntimeError("can't start new thread")

    with monkeypatch.context() as patch:
        patch.setattr(registry_module.threading.Thread, "start", refuse)
        assert live() == ("two_tower", "v1")  # the due check could not start its thread
    assert live() == ("two_tower", "v1")  # the next one can: the claim was given back
    wait_for_version(live, "v2")
