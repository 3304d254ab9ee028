"""FlowRecord codec: round trips and strict rejection of everything else."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flowstate.errors import RecordError, UsageError
from flowstate.record import MAX_POP_LEN, RECORD_VERSION, FlowRecord, decode_record

REC = FlowRecord.make("2001:db8:b::1", "192.0.2.10", 1_700_000_000_000, "ams1")

records = st.builds(
    FlowRecord,
    backend_ip=st.binary(min_size=16, max_size=16),
    vip_ip=st.one_of(st.binary(min_size=4, max_size=4), st.binary(min_size=16, max_size=16)),
    created_ms=st.integers(0, (1 << 63) - 1),
    pop=st.text(min_size=1, max_size=8).filter(lambda s: 0 < len(s.encode()) <= MAX_POP_LEN),
)


@given(records)
def test_round_trip(rec: FlowRecord) -> None:
    assert decode_record(rec.encode()) == rec


def test_golden_encoding() -> None:
    assert REC.encode().hex() == (
        "9501c41020010db8000b00000000000000000001c404c000020acf0000018bcfe56800a4616d7331"
    )
    assert len(REC.encode()) == 40
    assert str(REC.backend) == "2001:db8:b::1" and str(REC.vip) == "192.0.2.10"


def _pack(obj: object) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


GOOD = [RECORD_VERSION, REC.backend_ip, REC.vip_ip, REC.created_ms, REC.pop]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        REC.encode() + b"\x00",  # trailing bytes
        _pack(GOOD[:4]),
        _pack([*GOOD, 1]),
        _pack({"v": 1}),
        _pack([2, *GOOD[1:]]),  # future version
        _pack([0, *GOOD[1:]]),
        _pack([True, *GOOD[1:]]),
        _pack(["1", *GOOD[1:]]),
        _pack([1, b"\x00" * 15, *GOOD[2:]]),  # short backend
        _pack([1, "2001:db8::1", *GOOD[2:]]),  # text, not packed
        _pack([1, REC.backend_ip, b"\x00" * 5, *GOOD[3:]]),
        _pack([1, REC.backend_ip, REC.vip_ip, -1, "ams1"]),
        _pack([1, REC.backend_ip, REC.vip_ip, 1.5, "ams1"]),
        _pack([1, REC.backend_ip, REC.vip_ip, 1 << 63, "ams1"]),
        _pack([1, REC.backend_ip, REC.vip_ip, 1, ""]),
        _pack([1, REC.backend_ip, REC.vip_ip, 1, "x" * (MAX_POP_LEN + 1)]),
        _pack([1, REC.backend_ip, REC.vip_ip, 1, b"ams1"]),
        _pack([1, REC.backend_ip, REC.vip_ip, 1, None]),
    ],
)
def test_rejects_garbage(data: bytes) -> None:
    with pytest.raises(RecordError):
        decode_record(data)


@given(st.binary(max_size=80))
def test_random_bytes_decode_or_raise_record_error(data: bytes) -> None:
    try:
        rec = decode_record(data)
    except RecordError:
        return
    assert decode_record(rec.encode()) == rec


@given(records, st.integers(0, 39), st.integers(0, 255))
def test_mutations_decode_or_raise_record_error(rec: FlowRecord, pos: int, byte: int) -> None:
    data = bytearray(rec.encode())
    data[pos % len(data)] = byte
    with contextlib.suppress(RecordError):
        decode_record(bytes(data))


def test_make_rejects_bad_values() -> None:
    with pytest.raises(UsageError):
        FlowRecord.make("192.0.2.1", "192.0.2.10", 1, "ams1")  # backend must be IPv6
    with pytest.raises(UsageError):
        FlowRecord.make("2001:db8::1", "192.0.2.10", -5, "ams1")
    with pytest.raises(UsageError):
        FlowRecord.make("2001:db8::1", "192.0.2.10", 1, "")
