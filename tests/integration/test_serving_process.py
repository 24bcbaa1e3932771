"""Process-wide settings the API applies at start-up (real Redis and Milvus behind create_app)."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from serving.app import create_app
from serving.config import Settings

pytestmark = pytest.mark.integration


def test_the_api_scores_with_the_configured_torch_threads(settings: Settings) -> None:
    # torch defaults to a thread per core; on small batches the second one only spins (serving_torch_threads).
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with TestClient(create_app(settings)) as client:
            assert client.get("/healthz").status_code == 200
            # Read on the app's own thread (the event loop's, where requests score).
            assert client.portal.call(_num_threads) == settings.model.serving_torch_threads == 1
    finally:
        torch.set_num_threads(before)


async def _num_threads() -> int:
    return torch.get_num_threads()
