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


def fib(*entries: tuple[str, int, list[tuple[int, bytes]]], table: int = 254) -> _Reply:
    """A route dump: (prefix, metric, [(oif, gateway)]) per route; 2+ next hops: multipath."""
    messages = []
    for prefix, metric, hops in entries:
        net = ipaddress.IPv6Network(prefix)
        body = struct.pack(
            "=BBBBBBBBI", socket.AF_INET6, net.prefixlen, 0, 0, table, 3, 0, neigh.RTN_UNICAST, 0
        )
        if net.prefixlen:
            body += _attr(neigh.RTA_DST, net.network_address.packed)
        body += _attr(neigh.RTA_TABLE, struct.pack("=I", table))
        body += _attr(neigh.RTA_PRIORITY, struct.pack("=I", metric))
        if len(hops) == 1:
            oif, gateway = hops[0]
            body += _attr(neigh.RTA_OIF, struct.pack("=I", oif))
            body += _attr(neigh.RTA_GATEWAY, gateway) if gateway else b""
        else:
            nexthops = b""
            for oif, gateway in hops:
                nested = _attr(neigh.RTA_GATEWAY, gateway) if gateway else b""
                nexthops += struct.pack("=HBBi", 8 + len(nested), 0, 0, oif) + nested
            body += _attr(neigh.RTA_MULTIPATH, nexthops)
        messages.append((neigh.RTM_NEWROUTE, body))
    return _Reply(0, messages)


def drive(
    addresses: list[bytes],
    routes: list[_Reply],
    links: dict[int, _Reply],
    table: _Reply,
    probe: bool = True,
    routing: _Reply | None = None,
) -> tuple[dict[bytes, Link], list[tuple[int, bytes]]]:
    """Run the steps; returns the links and the (ifindex, address) of each probe asked for.

    `routing` answers a route dump, which must be asked for if and only if it is given."""
    steps = _resolve_steps(addresses, probe)
    assert [r.kind for r in next(steps)] == [neigh.RTM_GETROUTE] * len(addresses)
    requests = steps.send(routes)
    asked = [struct.unpack_from("=BxHiII", r.body)[2] for r in requests[:-1]]
    assert requests[-1].is_dump and requests[-1].kind == neigh.RTM_GETNEIGH
    probes: list[tuple[int, bytes]] = []
    try:
        requests = steps.send([links[i] for i in asked] + [table])
        if routing is not None:
            assert [(r.kind, r.is_dump) for r in requests] == [(neigh.RTM_GETROUTE, True)]
            requests = steps.send([routing])
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


UPLINK_GW = ipaddress.IPv6Address("fd00:2::1").packed
FABRIC_GW = ipaddress.IPv6Address("fd00:4::21").packed
OTHER_GW = ipaddress.IPv6Address("fd00:4::22").packed
ELSEWHERE_GW = ipaddress.IPv6Address("fd00:4::99").packed


def test_a_route_skipped_for_its_failed_gateway_is_probed() -> None:
    """The pop-cut bug: the kernel of a host that does not forward passes over the backend's
    route whose gateway is FAILED and answers with the default route; the cache follows it,
    names the skipped gateway and probes it (else nothing would for up to a minute)."""
    table = neighbours(
        (2, UPLINK_GW, neigh.NUD_REACHABLE, GW_MAC), (3, FABRIC_GW, neigh.NUD_FAILED, b"")
    )
    routing = fib(
        ("::/0", 1024, [(2, UPLINK_GW)]),
        ("fd00:2::/64", 256, [(2, b"")]),
        ("fd00:3::/64", 1024, [(3, FABRIC_GW)]),
        ("fd00:3::2/128", 1024, [(3, FABRIC_GW)]),
    )
    links, probes = drive([BEHIND], [route(2, gateway=UPLINK_GW)], LINKS, table, routing=routing)
    assert links[BEHIND] == Link(2, "f0", F0_MAC, GW_MAC, 1500, UPLINK_GW, bypassed=FABRIC_GW)
    assert probes == [(3, FABRIC_GW)]

    # Once the gateway answers, the kernel takes the better route again: nothing skipped.
    table = neighbours(
        (2, UPLINK_GW, neigh.NUD_REACHABLE, GW_MAC), (3, FABRIC_GW, neigh.NUD_REACHABLE, BE_MAC)
    )
    links, probes = drive([BEHIND], [route(3, gateway=FABRIC_GW)], LINKS, table)
    assert links[BEHIND] == Link(3, "f1", F1_MAC, BE_MAC, 9000, FABRIC_GW)
    assert probes == []


def test_skipped_routes_best_first_and_multipath() -> None:
    """A lower metric on the same prefix is better too; every unusable next hop of every
    better route is probed, the best route's first is named."""
    table = neighbours(
        (2, UPLINK_GW, neigh.NUD_REACHABLE, GW_MAC),
        (3, FABRIC_GW, neigh.NUD_FAILED, b""),
        (3, OTHER_GW, neigh.NUD_INCOMPLETE, b""),
        (3, GATEWAY, neigh.NUD_FAILED, b""),
        (3, ELSEWHERE_GW, neigh.NUD_FAILED, b""),
    )
    routing = fib(
        ("fd00:3::/64", 100, [(3, GATEWAY)]),
        ("fd00:3::/64", 200, [(2, UPLINK_GW)]),
        ("fd00:3::/120", 50, [(3, FABRIC_GW), (3, OTHER_GW)]),
        ("fd00:3::100/120", 1, [(3, ELSEWHERE_GW)]),  # does not cover the backend
    )
    links, probes = drive([BEHIND], [route(2, gateway=UPLINK_GW)], LINKS, table, routing=routing)
    assert links[BEHIND].resolved and links[BEHIND].bypassed == FABRIC_GW
    assert sorted(probes) == sorted([(3, FABRIC_GW), (3, OTHER_GW), (3, GATEWAY)])


def test_a_worse_route_with_a_dead_gateway_is_left_alone() -> None:
    """A FAILED gateway of a less specific (or costlier) route than the one taken is no
    detour: not probed, and the backend is not marked (which would refresh it at retry_s)."""
    table = neighbours(
        (2, UPLINK_GW, neigh.NUD_FAILED, b""),
        (3, FABRIC_GW, neigh.NUD_REACHABLE, BE_MAC),
        (3, OTHER_GW, neigh.NUD_FAILED, b""),
    )
    routing = fib(
        ("::/0", 1024, [(2, UPLINK_GW)]),
        ("fd00:3::2/128", 1024, [(3, FABRIC_GW)]),
        ("fd00:3::2/128", 2048, [(3, OTHER_GW)]),
    )
    # A better route in another table: not the table the kernel's answer came from (254).
    routing.messages += fib(("fd00:3::2/128", 1, [(3, OTHER_GW)]), table=100).messages
    links, probes = drive([BEHIND], [route(3, gateway=FABRIC_GW)], LINKS, table, routing=routing)
    assert links[BEHIND] == Link(3, "f1", F1_MAC, BE_MAC, 9000, FABRIC_GW)
    assert probes == []


def test_routes_changed_since_the_lookup() -> None:
    """The taken route is not in the dump (it changed meanwhile): nothing is inferred."""
    table = neighbours(
        (2, UPLINK_GW, neigh.NUD_REACHABLE, GW_MAC), (3, FABRIC_GW, neigh.NUD_FAILED, b"")
    )
    routing = fib(("fd00:3::2/128", 1024, [(3, FABRIC_GW)]))
    links, probes = drive([BEHIND], [route(2, gateway=UPLINK_GW)], LINKS, table, routing=routing)
    assert links[BEHIND].resolved and not links[BEHIND].bypassed
    assert probes == []


def test_a_failed_route_dump_leaves_the_links_alone() -> None:
    table = neighbours(
        (2, UPLINK_GW, neigh.NUD_REACHABLE, GW_MAC), (3, FABRIC_GW, neigh.NUD_FAILED, b"")
    )
    failed = _Reply(errno.EPERM, [])
    links, probes = drive([BEHIND], [route(2, gateway=UPLINK_GW)], LINKS, table, routing=failed)
    assert links[BEHIND] == Link(2, "f0", F0_MAC, GW_MAC, 1500, UPLINK_GW)
    assert probes == []


def test_cache_refreshes_fast_while_routed_around_a_gateway() -> None:
    cache = neigh.NeighbourCache([BEHIND], refresh_s=5.0, retry_s=0.5)
    good = Link(2, "f0", F0_MAC, GW_MAC, 1500, UPLINK_GW)
    assert cache._apply({BEHIND: good}) == {BEHIND: good}
    assert cache.next_refresh_s() == 5.0
    detour = Link(2, "f0", F0_MAC, GW_MAC, 1500, UPLINK_GW, bypassed=FABRIC_GW)
    assert cache._apply({BEHIND: detour}) == {BEHIND: detour}
    assert cache.next_refresh_s() == 0.5
    assert cache._apply({BEHIND: detour}) == {}


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
