"""Backend link resolution without a kernel: the netlink steps driven with crafted replies."""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct

import pytest

from flowstate.errors import UsageError
from forwarder import neigh
from forwarder.neigh import Link, _attr, _Batch, _Reply, _Request, _resolve_steps

DIRECT = ipaddress.IPv6Address("fd00:1::2").packed
BEHIND = ipaddress.IPv6Address("fd00:3::2").packed
GATEWAY = ipaddress.IPv6Address("fe80::1").packed
F0_MAC, F1_MAC = bytes.fromhex("020000000f00"), bytes.fromhex("020000000f01")
BE_MAC, GW_MAC = bytes.fromhex("02000000be01"), bytes.fromhex("020000000001")


def route(oif: int, gateway: bytes = b"", mtu: int = 0, kind: int = neigh.RTN_UNICAST) -> _Reply:
    body = struct.pack("=BBBBBBBBI", socket.AF_INET6, 128, 0, 0, 254, 0, 0, kind, 0)
    body += _attr(neigh.RTA_OIF, struct.pack("=I", oif))
    if gateway:
        body += _attr(neigh.RTA_GATEWAY, gateway)
    if mtu:
        body += _attr(neigh.RTA_METRICS, _attr(neigh.RTAX_MTU, struct.pack("=I", mtu)))
    return _Reply(0, [(neigh.RTM_NEWROUTE, body)])


def link(index: int, name: str, mac: bytes, mtu: int = 1500, hw: int = 1) -> _Reply:
    body = struct.pack("=BxHiII", socket.AF_UNSPEC, hw, index, 0, 0)
    body += _attr(neigh.IFLA_IFNAME, name.encode() + b"\0") + _attr(neigh.IFLA_ADDRESS, mac)
    body += _attr(neigh.IFLA_MTU, struct.pack("=I", mtu))
    return _Reply(0, [(neigh.RTM_NEWLINK, body)])


def neighbours(*entries: tuple[int, bytes, int, bytes]) -> _Reply:
    messages = []
    for ifindex, address, state, lladdr in entries:
        body = struct.pack("=BxxxiHBB", socket.AF_INET6, ifindex, state, 0, 0)
        body += _attr(neigh.NDA_DST, address) + (_attr(neigh.NDA_LLADDR, lladdr) if lladdr else b"")
        messages.append((neigh.RTM_NEWNEIGH, body))
    return _Reply(0, messages)


def drive(
    addresses: list[bytes],
    routes: list[_Reply],
    links: dict[int, _Reply],
    table: _Reply,
    probe: bool = True,
) -> tuple[dict[bytes, Link], list[tuple[int, bytes]]]:
    """Run the steps; returns the links and the (ifindex, address) of each probe asked for."""
    steps = _resolve_steps(addresses, probe)
    assert [r.kind for r in next(steps)] == [neigh.RTM_GETROUTE] * len(addresses)
    requests = steps.send(routes)
    asked = [struct.unpack_from("=BxHiII", r.body)[2] for r in requests[:-1]]
    assert requests[-1].is_dump and requests[-1].kind == neigh.RTM_GETNEIGH
    probes: list[tuple[int, bytes]] = []
    try:
        requests = steps.send([links[i] for i in asked] + [table])
        for r in requests:
            assert r.kind == neigh.RTM_NEWNEIGH and r.flags & neigh.NLM_F_ACK
            family, ifindex, _state, flags, _type = struct.unpack_from("=BxxxiHBB", r.body)
            assert (family, flags) == (socket.AF_INET6, neigh.NTF_USE)
            probes.append((ifindex, neigh._attrs(r.body, 12)[neigh.NDA_DST]))
        steps.send([_Reply() for _ in requests])
    except StopIteration as finished:
        return finished.value, probes
    raise AssertionError("steps did not finish")


LINKS = {2: link(2, "f0", F0_MAC), 3: link(3, "f1", F1_MAC, mtu=9000)}


def test_direct_and_gatewayed() -> None:
    links, probes = drive(
        [DIRECT, BEHIND],
        [route(2), route(3, gateway=GATEWAY, mtu=1400)],
        LINKS,
        neighbours((2, DIRECT, neigh.NUD_REACHABLE, BE_MAC), (3, GATEWAY, neigh.NUD_DELAY, GW_MAC)),
    )
    assert links[DIRECT] == Link(2, "f0", F0_MAC, BE_MAC, 1500, DIRECT)
    assert links[BEHIND] == Link(3, "f1", F1_MAC, GW_MAC, 1400, GATEWAY)
    assert probes == []


def test_stale_is_used_and_reconfirmed() -> None:
    links, probes = drive(
        [DIRECT], [route(2)], LINKS, neighbours((2, DIRECT, neigh.NUD_STALE, BE_MAC))
    )
    assert links[DIRECT].dst_mac == BE_MAC
    assert probes == [(2, DIRECT)]


@pytest.mark.parametrize(
    ("state", "lladdr", "reason"),
    [
        (None, b"", "neighbour missing"),
        (neigh.NUD_INCOMPLETE, b"", "neighbour INCOMPLETE"),
        (neigh.NUD_FAILED, b"", "neighbour FAILED"),
        (0, b"", "neighbour NONE"),
        (neigh.NUD_NOARP, b"", "neighbour NOARP without a link-layer address"),
    ],
)
def test_unresolved_neighbours_are_probed(state: int | None, lladdr: bytes, reason: str) -> None:
    table = neighbours() if state is None else neighbours((2, DIRECT, state, lladdr))
    links, probes = drive([DIRECT], [route(2)], LINKS, table)
    assert links[DIRECT] == Link(next_hop=DIRECT, reason=reason)
    should_probe = state != neigh.NUD_NOARP
    assert probes == ([(2, DIRECT)] if should_probe else [])


def test_no_probe_when_asked_not_to() -> None:
    links, probes = drive([DIRECT], [route(2)], LINKS, neighbours(), probe=False)
    assert not links[DIRECT].resolved and probes == []


def test_probes_are_deduplicated_per_next_hop() -> None:
    other = ipaddress.IPv6Address("fd00:3::3").packed
    _links, probes = drive(
        [BEHIND, other],
        [route(3, gateway=GATEWAY), route(3, gateway=GATEWAY)],
        LINKS,
        neighbours(),
    )
    assert probes == [(3, GATEWAY)]


def test_route_failures() -> None:
    steps = _resolve_steps([DIRECT, BEHIND, GATEWAY], True)
    next(steps)
    unreachable = _Reply(errno.ENETUNREACH, [])
    requests = steps.send([unreachable, route(1, kind=neigh.RTN_LOCAL), route(4)])
    assert len(requests) == 2  # link 4 and the neighbour dump
    with pytest.raises(StopIteration) as finished:
        steps.send([link(4, "tun0", b"", hw=65534), neighbours()])
    links = finished.value.value
    assert links[DIRECT] == Link(reason="no route: Network is unreachable")
    assert links[BEHIND] == Link(reason="address is local to this host")
    assert links[GATEWAY] == Link(next_hop=GATEWAY, reason="interface tun0 is not Ethernet")


def test_no_addresses_no_requests() -> None:
    assert neigh.resolve_links_sync([]) == {}
    with pytest.raises(UsageError):
        neigh.resolve_links_sync(["192.0.2.1"])


def _message(kind: int, flags: int, seq: int, payload: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(payload), kind, flags, seq, 0) + payload


def test_batch_bookkeeping() -> None:
    get = _Request(neigh.RTM_GETROUTE, neigh.NLM_F_REQUEST, b"")
    dump = _Request(neigh.RTM_GETNEIGH, neigh.NLM_F_REQUEST | neigh.NLM_F_DUMP, b"")
    batch = _Batch([get, dump, get], first_seq=100)
    assert [struct.unpack_from("=IHHII", batch.payload, 16 * i)[3] for i in range(3)] == [
        100,
        101,
        102,
    ]
    progress = []
    for datagram in [
        _message(neigh.RTM_NEWROUTE, 0, 99, b"late"),  # an abandoned batch's answer
        _message(neigh.RTM_NEWROUTE, 0, 100, b"rt00") + _message(28, 2, 101, b"nb01"),
        _message(28, 2, 101, b"nb02") + _message(neigh.NLMSG_DONE, 2, 101, bytes(4)),
        _message(neigh.NLMSG_ERROR, 0, 102, struct.pack("=i", -errno.ENETUNREACH)),
    ]:
        batch.feed(datagram)
        progress.append(batch.done)
    assert progress == [False, False, False, True]
    first, second, third = batch.replies()
    assert first == _Reply(0, [(neigh.RTM_NEWROUTE, b"rt00")])
    assert second == _Reply(0, [(28, b"nb01"), (28, b"nb02")])
    assert third == _Reply(errno.ENETUNREACH, [])
