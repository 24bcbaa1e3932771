"""The feature sink's hand-written Feast encoding is byte for byte what protobuf writes.

Feast's reader parses these bytes; a difference would mean wrong or unreadable
features, so every shape the views use is compared with the protobuf library.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone

import pytest
from feast.protos.feast.types.Value_pb2 import DoubleList, StringList
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.types import Array, Float64, Int64, String
from google.protobuf.timestamp_pb2 import Timestamp

from feature_repo import feature_definitions as defs
from feature_repo.store import OnlineWriter, _epoch_us, timestamp_bytes, value_encoder
from serving.config import load_settings

CASES = [
    (String, ["", "a", "Drama", "é漢字🙂", "x" * 300, 42], lambda v: ValueProto(string_val=str(v))),
    (Int64, [0, 1, 127, 128, 300, 2**40, -1, -(2**63), 2**63 - 1, 3.0],
     lambda v: ValueProto(int64_val=int(v))),
    (Float64, [0.0, -0.0, 1.5, -2.25, 1e-300, 1e300, math.inf, 7, 0.1],
     lambda v: ValueProto(double_val=float(v))),
    (Array(String), [[], [""], ["a", "bb"], ["x" * 200] * 3, [1, 2]],
     lambda v: ValueProto(string_list_val=StringList(val=[str(x) for x in v]))),
    (Array(Float64), [[], [0.0], [1.0, -2.5, 3e10], [0.5] * 40],
     lambda v: ValueProto(double_list_val=DoubleList(val=[float(x) for x in v]))),
]


@pytest.mark.parametrize(("dtype", "values", "reference"), CASES, ids=[str(c[0]) for c in CASES])
def test_values_encode_exactly_as_protobuf(dtype, values, reference) -> None:
    encode = value_encoder(dtype)
    for value in values + values:  # twice: repeated list elements come from a cache
        assert encode(value) == reference(value).SerializeToString(), value


def test_the_writer_encodes_a_missing_value_as_an_unset_value() -> None:
    writer = OnlineWriter(load_settings(environment="test"))  # builds commands only: no Redis I/O
    [command] = writer.commands({"user_profile": [("u1", {"region": "ca"}, 1_000_000)]})
    fields = dict(zip(command[2::2], command[3::2], strict=True))
    encoded = [value for name, value in fields.items() if not str(name).startswith("_ts:")]
    assert ValueProto(string_val="ca").SerializeToString() in encoded
    assert encoded.count(ValueProto().SerializeToString()) == len(encoded) - 1  # every feature not given


def test_every_view_field_has_an_encoder() -> None:
    for view in defs.FEATURE_VIEWS:
        for feature in view.features:
            value_encoder(feature.dtype)


@pytest.mark.parametrize("epoch_us", [0, 1, 999_999, 1_000_000, 1_714_564_800_123_456, 1_714_564_800_000_000,
                                      4_102_444_800_000_001])
def test_timestamps_encode_exactly_as_protobuf(epoch_us: int) -> None:
    stamp = Timestamp()
    stamp.FromMicroseconds(epoch_us)
    assert timestamp_bytes(epoch_us) == stamp.SerializeToString()


def test_datetimes_become_epoch_microseconds() -> None:
    moment = datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=UTC)
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    assert _epoch_us(moment) == stamp.ToMicroseconds()
    assert _epoch_us(moment.astimezone(timezone(timedelta(hours=-7)))) == stamp.ToMicroseconds()
    assert _epoch_us(moment.replace(tzinfo=None)) == stamp.ToMicroseconds()  # naive = UTC, as protobuf reads it
