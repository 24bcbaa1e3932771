"""API key records: written to Redis by the admin CLI (infra/apikeys.py), read by the API.

Only a keyed SHA-256 hash of a key is ever stored (it is the Redis key name);
the record itself holds no secret. Redis stores it as a flat hash so the
rate-limit Lua script (serving/security.py) can read scopes and rate without
parsing JSON.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import Field

from schemas._base import Record, ShortText, utc_now


class ApiScope(StrEnum):
    recs_read = "recs:read"
    events_write = "events:write"
    catalog_write = "catalog:write"
    # admin grants every other scope too (model refresh, key management).
    admin = "admin"


class ApiKeyRecord(Record):
    """What the service knows about one API key (never the key itself)."""

    key_id: str = Field(
        pattern=r"^[0-9a-f]{16}$",
        description="Public id: the first 16 hex digits of the key's hash; names the key in logs, CLI and metrics.",
    )
    name: ShortText = Field(min_length=1, description="Who holds the key, e.g. 'web-frontend'.")
    scopes: list[ApiScope] = Field(min_length=1)
    rate_per_s: float = Field(ge=0, le=1e6, description="Sustained requests per second; 0 means unlimited.")
    burst: int = Field(ge=1, le=10_000_000, description="Token-bucket size: requests allowed at once after a pause.")
    created_at: datetime = Field(default_factory=utc_now)

    def to_redis(self) -> dict[str, str]:
        """Flat string fields for HSET (scopes comma-joined for the Lua script)."""
        return {
            "key_id": self.key_id,
            "name": self.name,
            "scopes": ",".join(s.value for s in self.scopes),
            "rate_per_s": repr(float(self.rate_per_s)),
            "burst": str(self.burst),
            "created_at": self.created_at.isoformat(),
        }

    @classmethod
    def from_redis(cls, fields: dict[bytes | str, bytes | str]) -> ApiKeyRecord:
        """Inverse of :meth:`to_redis` (raises pydantic.ValidationError on a corrupt record)."""
        flat = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in fields.items()
        }
        return cls.model_validate({**flat, "scopes": [s for s in flat.get("scopes", "").split(",") if s]})

    def allows(self, scope: ApiScope | str) -> bool:
        return ApiScope.admin in self.scopes or ApiScope(scope) in self.scopes


class ApiKeyCreate(Record):
    """Body of POST /admin/keys."""

    name: ShortText = Field(min_length=1)
    scopes: list[ApiScope] = Field(min_length=1, max_length=4)
    rate_per_s: float | None = Field(default=None, ge=0, le=1e6, description="Default: security.default_rate_per_s.")
    burst: int | None = Field(default=None, ge=1, le=10_000_000)


class ApiKeyCreated(ApiKeyRecord):
    """Answer of POST /admin/keys: the only time the key itself is shown."""

    api_key: str = Field(description="Store it now: only its hash is kept.")


class ApiKeyList(Record):
    keys: list[ApiKeyRecord]
