"""All settings in one place: every default here, overridable by ``RECSYS_*`` env vars.

Nested sections use ``__``: ``RECSYS_KAFKA__BOOTSTRAP_SERVERS=broker:9092``.
Built once at each entry point (API, flow, CLI) and passed down.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.keys import RedisKeys
from schemas.topics import TopicSpec, topic_name


class KafkaSettings(BaseModel):
    bootstrap_servers: str = "127.0.0.1:9092"
    # Prefix for every topic name: isolates tenants or test runs on one broker.
    topic_prefix: str = ""
    # tansu makes a new group member wait ~23 s with the librdkafka default (DESIGN.md).
    session_timeout_ms: int = 6000
    # How long the API waits for the broker's ack before answering 503.
    produce_timeout_s: float = 3.0
    # librdkafka batching: small linger keeps p50 low, concurrency still batches.
    linger_ms: int = 2
    # Linger of the producer for best-effort records (impressions, dead letters):
    # batching them saves CPU on every served list; they reach the log this much later.
    best_effort_linger_ms: int = Field(default=50, ge=0, le=1000)


class RedisSettings(BaseModel):
    url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "recsys:"
    socket_timeout_s: float = 0.25
    # The reads every request makes (cached lists, user and item documents) share one
    # pipelined connection (serving/multiplexed_redis.py: 11 vs ~185 us of CPU per read with
    # 32 in flight, against redis-py's pooled client); false sends them through redis-py too.
    multiplexed_reads: bool = True


class MilvusSettings(BaseModel):
    uri: str = "http://127.0.0.1:19530"
    # The standalone server's health endpoint (port 9091); empty for Milvus Lite.
    health_url: str = "http://127.0.0.1:9091/healthz"
    timeout_s: float = 2.0


class ApiSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 8000
    # Bigger batches get 413: they would hold one request open for too long.
    max_batch_events: int = 1000
    # Request bodies over this size get 413 before they are parsed.
    max_body_bytes: int = 2_000_000
    # GET /recommendations is answered by a pure-ASGI lane in front of FastAPI's
    # router (serving/routes/recommendations.py, same checks and answers, a
    # fraction of the per-request cost); false sends it through FastAPI's route.
    get_recommendations_lane: bool = True


# Refused outside development/test (see Settings._check_production).
DEV_API_KEY_PEPPER = "insecure-development-pepper"


class SecuritySettings(BaseModel):
    """Admission control: API keys, scopes, per-key rate limits (serving/security.py,
    infra/apikeys.py) and load shedding under overload (serving/shedding.py)."""

    # Off only for local experiments: every route then answers without a key.
    auth_enabled: bool = True
    # Secret mixed into every key hash (HMAC-SHA256): a leaked Redis dump alone
    # cannot be used to check guessed keys. Changing it invalidates every key.
    api_key_pepper: str = DEV_API_KEY_PEPPER
    # Key records are cached in-process this long: a revoked key keeps working on
    # a replica for at most this many seconds. 0 disables the cache.
    key_cache_ttl_s: float = 5.0
    # While Redis is unreachable a key seen valid within this window is still
    # accepted (without rate limiting) so serving degrades instead of failing;
    # unknown keys get 503. 0 turns this grace off (fail closed).
    redis_outage_grace_s: float = 300.0
    # Token bucket for keys created without --rate/--burst.
    default_rate_per_s: float = 50.0
    default_burst: int = 100
    # Token leases (serving/security.py): a replica takes up to this share of a
    # key's rate (or burst, if smaller) from the shared Redis bucket at once and
    # spends it locally for at most rate_limit_lease_s. Bounds what one replica
    # can over-admit; keys whose share is under 2 tokens stay exact. 0: exact.
    rate_limit_lease_fraction: float = Field(default=0.02, ge=0, le=0.5)
    rate_limit_lease_s: float = Field(default=0.25, gt=0, le=5)
    # Load shedding: requests being handled at once in this process before the
    # lowest-priority requests are refused (503 + Retry-After). 0 turns it off.
    shed_max_in_flight: int = 64
    # Share of shed_max_in_flight each class may use: a class is refused once the
    # process holds more requests than its share, so low-priority surfaces go first
    # and the homepage keeps the whole capacity. Health and /metrics are never shed.
    shed_shares: dict[str, float] = Field(default_factory=lambda: {
        "homepage": 1.0, "ingest": 0.9, "other": 0.9, "up_next": 0.5, "related": 0.25,
    })


class ObservabilitySettings(BaseModel):
    """Structured logs and Prometheus metrics (serving/logging.py, serving/metrics.py)."""

    # "json": one JSON object per line (production); "text": human-readable (local debugging).
    log_format: Literal["json", "text"] = "json"
    log_level: str = "INFO"
    # A client's X-Request-ID is kept only if it is this short and plain; else a new one is made.
    max_request_id_length: int = 128
    # Live quality figures (serving/quality.py): sliding window, and the port its
    # process serves /metrics on (the API's own /metrics is on the API port).
    quality_window_s: float = 900.0
    quality_metrics_port: int = 9101
    # FastAPI's own OpenTelemetry spans and metrics, exported to the provider an operator
    # configures (e.g. opentelemetry-instrument). Off: the check it makes on every request
    # is skipped; the Prometheus metrics and JSON logs above do not depend on it.
    fastapi_telemetry: bool = False


class StackSettings(BaseModel):
    """The embedded local stack (infra/stack.py)."""

    state_dir: Path = Path(".recsys")
    broker_listen: str = "127.0.0.1:9092"
    # "server": the real Milvus standalone (milvus==2.3.5); "lite": milvus-lite server.
    milvus_backend: Literal["server", "lite"] = "server"
    milvus_port: int = 19530
    redis_port: int = 6379
    start_timeout_s: float = 90.0


class FeatureSettings(BaseModel):
    """Streaming features, co-visitation, trending and the archive (flows/, feature_repo/)."""

    # Feast project name; empty derives it from the Redis key prefix, so every
    # deployment (and every test) sharing one Redis gets its own feature rows.
    feast_project: str = ""
    # Feast's local registry file (one per project; `feast apply` writes it).
    registry_dir: Path = Path(".recsys/feast")
    # Per-key micro-batch: a user or item writes at most once per interval, so a
    # hot key costs one Redis write per interval, not one per event. Bounds freshness.
    flush_interval_s: float = 0.2
    # While writes are slow the interval stretches to twice the time a write takes
    # (bigger batches, cheaper per row), never beyond this.
    flush_interval_max_s: float = 0.5
    # Behind the log (a restart, a burst, a replay: the records read are seconds old), the
    # interval grows to half their age, up to this: fewer, bigger writes per key, so each
    # event costs less and the backlog drains sooner (flows/features.flush_interval).
    flush_interval_catchup_s: float = 2.0
    # Events older than the entity's newest event by more than this still count in
    # totals and decayed scores, but not in windowed counts, trending or co-visitation.
    lateness_s: float = 3600.0
    # How many recent interactions, consumed and skipped items each user keeps.
    recent_size: int = 50
    consumed_size: int = 1000  # up_next and the filters must never re-offer these: keep a long history
    skipped_size: int = 200
    # Event ids remembered per user to drop at-least-once duplicates.
    dedup_ids: int = 1000
    # Half-lives of the category affinities (short-term session taste, long-term taste).
    affinity_half_life_h: float = 72.0
    long_term_half_life_h: float = 24.0 * 90
    # A gap longer than this starts a new session (session counters reset).
    session_gap_s: float = 1800.0
    # Beta(alpha, beta) prior of the CTR: ~5% CTR until an item has real impressions.
    ctr_prior_alpha: float = 1.0
    ctr_prior_beta: float = 19.0
    # Trending: time decay half-life and how many items each trending list keeps.
    trending_half_life_h: float = 24.0
    trending_keep: int = 500
    # Co-visitation: items consumed by one user within this window are neighbours;
    # each new item is paired with at most this many previous ones.
    covisit_window_s: float = 86400.0
    covisit_max_recent: int = 10
    covisit_top_k: int = 100
    # Candidates kept in flow state per item (> top_k so ranks can change).
    covisit_keep: int = 300
    # Archive: local folder or s3:// URL (pyarrow filesystem), file size and age bounds.
    archive_url: str = ".recsys/archive"
    archive_max_rows: int = 50_000
    archive_flush_s: float = 10.0
    # Messages a Kafka source partition reads per poll.
    kafka_batch_size: int = 1000
    # How long the broker may hold a fetch waiting for data (fetch.wait.max.ms). The
    # embedded broker holds it this long when little is waiting, so it adds up to this
    # much latency per event; lower costs more idle fetch requests.
    kafka_fetch_wait_ms: int = 20
    # Recovery partitions created on first start (>= the number of processes).
    recovery_partitions: int = 4
    # In-process cache of item features in the API reader. A catalog change (status,
    # regions, rating...) evicts the item at once (the catalog-changes stream, checked
    # every reader_changes_poll_s); the TTL bounds how stale statistics (clicks,
    # impressions) may be, and anything a missed change would have left.
    reader_cache_ttl_s: float = 10.0
    reader_changes_poll_s: float = 0.1
    # Entries kept in the catalog-changes stream (approximate trim).
    catalog_changes_keep: int = 100_000


class ModelSettings(BaseModel):
    """The two-tower model, its training and its registry (model/)."""

    # Where training reads the log: "topic" replays the interactions topic from
    # the beginning; "archive" reads the Parquet archive of flows/archive.py.
    training_source: Literal["topic", "archive"] = "topic"
    # Parquet archive root (flows/archive.py); relative paths are under the state dir.
    archive_dir: Path = Path("archive/interactions")
    # Embedding size of both towers: 64 keeps CPU encoding and HNSW memory small.
    dim: int = 64
    # Hash buckets for content tokens (category, tags, language, year, title words).
    content_buckets: int = 1 << 14
    # The user tower looks at this many most recent interactions.
    history_len: int = 50
    epochs: int = 6
    batch_size: int = 1024
    learning_rate: float = 0.005
    # Softmax temperature of the in-batch loss (dot products of unit vectors).
    temperature: float = 0.07
    # Log-popularity the item vectors keep on top of the log-Q correction (0: the unbiased
    # softmax). 1.0: offline NDCG@10 0.147 -> 0.186, prequential pipeline 0.093 -> 0.086
    # (validation splits; model/train.py has the measurements).
    popularity_prior: float = 1.0
    # The item-id embedding is dropped this often in training so content alone
    # must give a useful vector (that is what a brand-new item gets).
    id_dropout: float = 0.3
    seed: int = 7
    # Torch threads while training. 1 on purpose: on a shared 2-core machine two threads
    # measured 2.5x slower per step than one (oversubscription); raise it on a dedicated box.
    torch_threads: int = 1
    # Offline metrics: the last fraction of the log (by time) is held out.
    eval_holdout: float = 0.2
    # After evaluating, train again on the whole log for the version that ships.
    retrain_on_full_log: bool = True
    # Empty polls in a row that end a replay of a topic (tansu's high watermark is wrong).
    replay_idle_polls: int = 4
    replay_poll_timeout_s: float = 0.5
    # Versions kept on disk and in Milvus after a swap (the live one included).
    keep_versions: int = 2
    # How often API/flows check the registry for a new live version.
    reload_interval_s: float = 5.0


class RetrievalSettings(BaseModel):
    """Candidate generation (serving/candidates/) and the item vectors in Milvus (infra/milvus.py)."""

    # One collection per model version: "<collection_prefix>_<version>"; serving reads the alias.
    collection_prefix: str = "items"
    serving_alias: str = "items_serving"
    # HNSW, chosen over IVF on 1M x 64 synthetic items, 2 cores (bench/retrieval.py, README):
    # M=16/efConstruction=100 built in ~3-4 min (DESIGN.md: 4-5 min with 200); IVF_FLAT with
    # nlist 1024 took as long and lost 3-22% of region+freshness-filtered recall@100 at nprobe
    # 64-16 (nlist 256: 30 s, but 13-27% lost at nprobe 16-8), where HNSW kept 1.0.
    hnsw_m: int = 16
    hnsw_ef_construction: int = 100
    # Search-time ef is max(ef_search, k): k=500 needs ef >= 500 (DESIGN.md). 128 (vs 256):
    # region+freshness-filtered search p50 24 vs 39 ms at 1M; recall@100 vs exact 0.99
    # (0.97-0.98 under the region filter) at 100k and 1M (bench/results/retrieval.json).
    ef_search: int = 128
    # Merged, de-duplicated candidates per request.
    max_candidates: int = 1000
    # Per-source quotas; a source with quota 0 is off. The order is the merge order.
    quotas: dict[str, int] = Field(
        default_factory=lambda: {
            "ann": 400,  # user tower -> ANN
            "item2item": 100,  # ANN around the current / last item
            "covisit": 150,  # co-visitation ZSETs (features flow)
            "content": 150,  # filtered ANN within the user's top categories
            "trending_region": 100,  # trending in the user's region
            "trending": 150,  # global trending
            "fresh": 100,  # recent and cold-start items (exploration)
        }
    )
    # Each source gets this long; a late or failing source is skipped, the rest answer.
    source_timeout_s: float = 0.08
    # The whole candidate stage never takes longer than this.
    total_timeout_s: float = 0.15
    # Items published within this many days (or unseen by the model) form the fresh pool.
    fresh_days: float = 365.0
    # How many recent items seed item-to-item and co-visitation for a user without a current item.
    seed_items: int = 3
    # Seed items' vectors (item2item) are kept in process this long, and dropped when the live
    # model version changes: one Milvus round trip less per live request. 0 turns it off.
    seed_vector_cache_s: float = 60.0
    # Categories (by affinity) the content source searches in.
    content_categories: int = 3
    # content and fresh in one Milvus search (MilvusItemIndex.search_each): ~5 ms less Milvus CPU per
    # live request where both fill from it; a source crowded out of it is searched again after it
    # (exact, but one more call in a row). false: two searches side by side, as before.
    share_filtered_search: bool = True
    # Filter ANN by the user's region (items with no regions are shown everywhere).
    filter_by_region: bool = True


class RecommendSettings(BaseModel):
    """Serving: cache, budgets, fallbacks and ranking (serving/pipeline/service.py)."""

    # Paths tried in order until one yields a list; see the README's "Fallbacks".
    fallbacks: list[Literal["cache", "live", "trending_region", "popular"]] = Field(
        default_factory=lambda: ["cache", "live", "trending_region", "popular"]
    )
    # The whole request, all paths together (the spec's SLO is 200 ms; leave headroom).
    total_budget_ms: float = 150.0
    # Per-stage budgets inside the live path; a stage over budget fails that path only.
    features_budget_ms: float = 30.0
    candidates_budget_ms: float = 90.0
    # Background revalidation of a stale cached list may take longer (nobody waits).
    refresh_budget_ms: float = 5000.0
    # A cached list is fresh this long, then served stale while a refresh runs;
    # cold users (no history) get a short freshness so they turn personal quickly.
    cache_fresh_s: float = 300.0
    cache_fresh_cold_s: float = 30.0
    # Each list's freshness is shortened by a random share up to this, so lists written
    # together (a bulk recompute, a cache warm-up) are not all revalidated in the same second.
    cache_fresh_jitter: float = Field(default=0.1, ge=0.0, le=0.9)
    # Redis expiry of a cached list (after this, a miss goes to the live path).
    cache_ttl_s: float = 86_400.0
    # How many items a precomputed list keeps (pages are cut from it).
    cache_size: int = 50
    # The light ranker keeps this many candidates for the heavy ranker.
    light_keep: int = 200
    # Light-ranker weights per candidate source, and for the user's category affinity.
    # The two-tower ANN and co-visitation (the user's last items) are the strongest signals on
    # replayed MovieLens requests (serving/pipeline/ranking.py has the measurements).
    source_weights: dict[str, float] = Field(default_factory=lambda: {
        "ann": 1.0, "item2item": 0.3, "covisit": 1.0, "content": 0.2, "trending_region": 0.1,
        "trending": 0.1, "fresh": 0.05, "popular": 0.05, "affinity": 1.0,
    })
    # How deep the trending fallbacks read.
    fallback_depth: int = 200
    # Precompute flow: wait this long after a user's last event before recomputing.
    debounce_s: float = 1.0
    # After a user's events mark their lists stale, the API serves the stale list and leaves the
    # recompute to the precompute flow for this long: the flow folds those very events in, while a
    # recompute here would read features that may not have them yet and stamp the result fresh
    # (a just-liked item back on the homepage). Past it (the flow down or behind), a request
    # recomputes the list itself.
    dirty_grace_s: float = Field(default=3.0, ge=0.0)
    # Only events this recent trigger a recompute (a replay of old history does not).
    recompute_horizon_s: float = 3600.0
    # Heavy ranker training (model/ranker.py): replayed requests and epochs per model version.
    ranker_requests: int = 1500
    ranker_epochs: int = 5
    # The policy file (serving/policies.yaml when empty).
    policy_path: str = ""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="RECSYS_", env_nested_delimiter="__", env_file=".env", extra="ignore"
    )

    environment: Literal["development", "test", "production"] = "development"
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    milvus: MilvusSettings = Field(default_factory=MilvusSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    stack: StackSettings = Field(default_factory=StackSettings)
    features: FeatureSettings = Field(default_factory=FeatureSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)
    observability: ObservabilitySettings = Field(default_factory=ObservabilitySettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    retrieval: RetrievalSettings = Field(default_factory=RetrievalSettings)
    recommend: RecommendSettings = Field(default_factory=RecommendSettings)

    @model_validator(mode="after")
    def _check_production(self) -> Settings:
        if self.environment == "production" and "127.0.0.1" in self.kafka.bootstrap_servers:
            raise ValueError("production settings point Kafka at loopback; set RECSYS_KAFKA__BOOTSTRAP_SERVERS")
        if self.environment not in ("development", "test"):
            if self.security.api_key_pepper == DEV_API_KEY_PEPPER:
                raise ValueError(
                    f"environment {self.environment!r} refuses the default API key pepper; "
                    "set RECSYS_SECURITY__API_KEY_PEPPER to a long random secret"
                )
            if not self.security.auth_enabled:
                raise ValueError(
                    f"environment {self.environment!r} refuses RECSYS_SECURITY__AUTH_ENABLED=false"
                )
            if len(self.security.api_key_pepper) < 16:
                raise ValueError("RECSYS_SECURITY__API_KEY_PEPPER must be at least 16 characters")
        return self

    def topic(self, spec: TopicSpec) -> str:
        """Physical name of a topic under this deployment's prefix."""
        return topic_name(spec, self.kafka.topic_prefix)

    @cached_property
    def keys(self) -> RedisKeys:
        return RedisKeys(self.redis.key_prefix)


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment (and .env), with explicit overrides on top."""
    return Settings(**overrides)  # type: ignore[arg-type]


def env_example() -> str:
    """The text of .env.example: every setting as a commented RECSYS_* line with its default."""
    import json

    lines = [
        "# Every setting of the service with its default (generated: python -m serving.config > .env.example).",
        "# Uncomment and change what you need; the meaning of each is commented in serving/config.py.",
        "",
        f"# RECSYS_ENVIRONMENT={Settings.model_fields['environment'].default}",
    ]
    defaults = Settings.model_construct()
    for section in Settings.model_fields:
        value = getattr(defaults, section, None)
        if not isinstance(value, BaseModel):
            continue
        lines += ["", f"# --- {section}: {(type(value).__doc__ or '').strip().splitlines()[0] if type(value).__doc__ else section}"]
        for name, item in value.model_dump(mode="json").items():
            text = "" if item is None else json.dumps(item) if isinstance(item, dict | list | bool) else str(item)
            lines.append(f"# RECSYS_{section.upper()}__{name.upper()}={text}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(env_example(), end="")
