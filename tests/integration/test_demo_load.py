"""make up's first-model check on the real Milvus: a registry entry whose files or collection are gone does not count as live."""

from __future__ import annotations

from pathlib import Path

import pytest

from demo.load import live_model_missing
from serving.config import Settings

pytestmark = pytest.mark.integration


def test_a_live_entry_without_its_artefacts_or_collection_is_reported(settings: Settings, tmp_path: Path) -> None:
    from infra.milvus import (
        collection_name,
        connect,
        create_item_collection,
        drop_collection,
        swap_alias,
    )

    tag = settings.redis.key_prefix.split(":")[1]  # this test's own alias and collections
    settings.retrieval.collection_prefix, settings.retrieval.serving_alias = f"it_{tag}", f"it_{tag}_serving"
    gone = live_model_missing(settings, {"version": "v_gone", "artefacts": str(tmp_path / "nowhere")})
    assert gone is not None and "artefacts" in gone
    no_collection = live_model_missing(settings, {"version": "v_none", "artefacts": str(tmp_path)})
    assert no_collection is not None and settings.retrieval.serving_alias in no_collection

    client = connect(settings)
    name = collection_name(settings, "v_demo_check")
    try:
        create_item_collection(client, name, settings.model.dim, settings, load=False)
        swap_alias(client, settings.retrieval.serving_alias, name)
        assert live_model_missing(settings, {"version": "v_demo_check", "artefacts": str(tmp_path)}) is None
    finally:
        if settings.retrieval.serving_alias in client.list_aliases().get("aliases", []):
            client.drop_alias(settings.retrieval.serving_alias)
        drop_collection(client, name)
        client.close()
