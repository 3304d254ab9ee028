"""5-tuple encoding, hashing and key schema: golden values and properties."""

from __future__ import annotations

import ipaddress
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flowstate.errors import UsageError
from flowstate.flow import KEY_PREFIX, FiveTuple, Proto, flow_digest, key_slot

V4 = FiveTuple.make("tcp", "10.0.0.1", 1234, "192.0.2.10", 80)
V6 = FiveTuple.make("udp", "2001:db8::1", 5353, "2001:db8:a::10", 53)


def test_canonical_encoding_golden() -> None:
    assert V4.encode().hex() == "040604d200500a000001c000020a"
    assert V6.encode().hex() == (
        "061114e9003520010db800000000000000000000000120010db8000a00000000000000000010"
    )
    assert len(V4.encode()) == 14 and len(V6.encode()) == 38


def test_hash_golden() -> None:
    # Frozen: these values are the cross-POP and C/Python contract. Changing them re-keys
    # every stored flow and moves every Maglev choice.
    assert V4.digest().hex() == "6798694e125b83448c2e291a8dfcbbea"
    assert V4.hash64() == 4936889750711277671
    assert V4.key().hex() == "6673313a6798694e125b83448c2e291a8dfcbbea"
    assert key_slot(V4.key()) == 11890
    assert V6.digest().hex() == "7b20168ae79f391a787e18b15b2bf5f1"
    assert V6.hash64() == 1889717335461601403
    assert key_slot(V6.key()) == 1440


def test_key_is_prefix_plus_digest() -> None:
    assert V4.key() == KEY_PREFIX + flow_digest(V4.encode())
    assert len(V4.key()) == 20


def test_key_slot_matches_redis_py_reference() -> None:
    from redis.crc import key_slot as redis_key_slot

    for key in (V4.key(), V6.key(), b"{user1000}.following", b"foo{}{bar}", b"{}x", b"a{b}c"):
        assert key_slot(key) == redis_key_slot(key)


def test_keys_spread_over_all_slots() -> None:
    # 200k flows from one client subnet to one VIP: the worst case for address locality.
    slots = Counter(
        key_slot(
            FiveTuple.make(
                "tcp", f"10.0.{i >> 8 & 255}.{i & 255}", 1024 + i % 50000, "192.0.2.10", 443
            ).key()
        )
        >> 10
        for i in range(200_000)
    )
    # 16 ranges of 1024 slots each receive 1/16 of the keys within 3%.
    assert len(slots) == 16
    for n in slots.values():
        assert abs(n - 12_500) < 375


def test_make_accepts_text_bytes_and_objects() -> None:
    a = FiveTuple.make(Proto.TCP, ipaddress.ip_address("10.0.0.1"), 1234, b"\xc0\x00\x02\x0a", 80)
    assert a == V4
    assert str(V4) == "tcp 10.0.0.1:1234 -> 192.0.2.10:80"
    assert str(V6) == "udp [2001:db8::1]:5353 -> [2001:db8:a::10]:53"
    assert V6.family == 6 and V4.family == 4


@pytest.mark.parametrize(
    "args",
    [
        ("icmp", "10.0.0.1", 1, "192.0.2.1", 80),
        ("tcp", "10.0.0.300", 1, "192.0.2.1", 80),
        ("tcp", "10.0.0.1", 70000, "192.0.2.1", 80),
        ("tcp", "10.0.0.1", -1, "192.0.2.1", 80),
        ("tcp", "10.0.0.1", 1, "2001:db8::1", 80),
        ("tcp", b"\x01\x02\x03", 1, "192.0.2.1", 80),
        (99, "10.0.0.1", 1, "192.0.2.1", 80),
    ],
)
def test_make_rejects_bad_input(args: tuple[object, ...]) -> None:
    with pytest.raises(UsageError):
        FiveTuple.make(*args)  # type: ignore[arg-type]


@given(
    st.sampled_from([Proto.TCP, Proto.UDP]),
    st.one_of(st.binary(min_size=4, max_size=4), st.binary(min_size=16, max_size=16)),
    st.integers(0, 65535),
    st.integers(0, 65535),
    st.data(),
)
def test_encoding_is_injective(
    proto: Proto, client: bytes, cport: int, vport: int, data: st.DataObject
) -> None:
    vip = data.draw(st.binary(min_size=len(client), max_size=len(client)))
    t = FiveTuple(proto, client, cport, vip, vport)
    other = data.draw(st.integers(0, 65535).filter(lambda p: p != cport))
    assert t.encode() != FiveTuple(proto, client, other, vip, vport).encode()
    assert t.encode() != FiveTuple(proto, vip, vport, client, cport).encode() or (
        (client, cport) == (vip, vport)
    )
