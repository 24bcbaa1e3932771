"""infra.stack's start loop and the Milvus retries, with stand-in processes (`sleep`), no Milvus."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import infra.stack as stack_module
from infra.stack import MILVUS, Component, EmbeddedStack, StackError
from serving.config import load_settings


@pytest.fixture
def stack(tmp_path: Path) -> EmbeddedStack:
    base = load_settings()
    return EmbeddedStack(load_settings(stack={**base.stack.model_dump(), "state_dir": tmp_path}))


def test_a_start_that_never_turns_ready_is_stopped_after_its_timeout(stack: EmbeddedStack) -> None:
    started = time.monotonic()
    with pytest.raises(StackError, match="not ready after 1s"):
        stack.start(Component(MILVUS, ["sleep", "60"], ready=lambda: False), timeout_s=1.0)
    assert time.monotonic() - started < 10
    assert not stack.pid(MILVUS)  # the hung process was stopped


def test_milvus_is_started_again_until_one_start_turns_healthy(stack: EmbeddedStack,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stack_module, "MILVUS_HANG_S", 0.5)
    attempts: list[float] = []

    def milvus() -> Component:
        attempts.append(time.monotonic())
        healthy_from = attempts[-1] + 0.2 if len(attempts) == 3 else float("inf")  # the third start works
        return Component(MILVUS, ["sleep", "60"], ready=lambda: time.monotonic() > healthy_from, poll_s=0.05)

    monkeypatch.setattr(stack, "milvus", milvus)
    said: list[str] = []
    try:
        assert stack.start_milvus(echo=said.append) == "started"
    finally:
        stack.stop(MILVUS)
    assert len(attempts) == 3 and len(said) == 2 and all("retrying" in line for line in said)


def test_milvus_start_gives_up_after_its_attempts(stack: EmbeddedStack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stack_module, "MILVUS_HANG_S", 0.3)
    monkeypatch.setattr(stack.settings.stack, "start_timeout_s", 0.3)
    monkeypatch.setattr(stack, "milvus", lambda: Component(MILVUS, ["sleep", "60"], ready=lambda: False, poll_s=0.05))
    with pytest.raises(StackError, match="milvus not ready"):
        stack.start_milvus(echo=lambda line: None)
