"""Write (or check) the JSON Schema files generated from the models.

    python -m schemas.export          # rewrite schemas/jsonschema/*.json
    python -m schemas.export --check  # exit 1 if any committed file is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import BaseModel

from schemas import api, catalog, events, features, models, security

OUT_DIR = Path(__file__).parent / "jsonschema"

EXPORTED: tuple[type[BaseModel], ...] = (
    events.InteractionEvent,
    events.ImpressionRecord,
    events.ControlCommand,
    events.DeadLetterRecord,
    catalog.ItemRecord,
    catalog.UserProfile,
    api.InteractionBatch,
    api.AcceptedResponse,
    api.UpdatedResponse,
    api.UserProfileUpdate,
    api.ItemUpsert,
    api.RecommendationRequest,
    api.RecommendationResponse,
    api.CachedRecommendationsResponse,
    api.ModelRefreshResponse,
    api.ErrorResponse,
    features.UserFeatures,
    features.ItemFeatures,
    features.OnlineFeaturesResponse,
    models.ModelVersion,
    models.ModelsResponse,
    security.ApiKeyRecord,
    security.ApiKeyCreate,
    security.ApiKeyCreated,
    security.ApiKeyList,
)


def render() -> dict[str, str]:
    """File name -> JSON text for every exported model."""
    return {
        f"{model.__name__}.json": json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n"
        for model in EXPORTED
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed files are stale")
    args = parser.parse_args(argv)
    wanted = render()
    stale = [name for name, text in wanted.items() if not (OUT_DIR / name).exists() or (OUT_DIR / name).read_text() != text]
    extra = sorted(p.name for p in OUT_DIR.glob("*.json") if p.name not in wanted)
    if args.check:
        for name in stale + extra:
            print(f"stale JSON schema: schemas/jsonschema/{name} (run: python -m schemas.export)")
        return 1 if stale or extra else 0
    OUT_DIR.mkdir(exist_ok=True)
    for name in extra:
        (OUT_DIR / name).unlink()
    for name, text in wanted.items():
        (OUT_DIR / name).write_text(text)
    print(f"wrote {len(wanted)} schemas to {OUT_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
