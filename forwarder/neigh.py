"""Egress link of each backend (interface, MACs, MTU) read from the kernel's routes and neighbours.

The forwarder sends on AF_PACKET, below the kernel's IP stack, so it builds the Ethernet header
itself: route lookup (`ip -6 route get`), then the next hop's neighbour entry (`ip -6 neigh`),
here over rtnetlink directly (no subprocess, no text to parse, one errno per backend).

Because the forwarder's own packets never pass through the kernel's neighbour layer, nothing
keeps entries fresh: a missing, INCOMPLETE, FAILED or STALE entry gets a probe (RTM_NEWNEIGH with
NTF_USE, the netlink twin of `ip neigh replace ADDR dev IF use`: the kernel resolves or
re-confirms the entry as if it had a packet to send). A STALE entry is still used meanwhile;
the others are reported unresolved for this round.

A host that does not forward (`net.ipv6.conf.all.forwarding=0`) also skips, in its route
lookups, a route whose gateway's entry is FAILED, and falls back to a less specific route (the
default route through the uplink, say) until the kernel re-probes that gateway itself, at most
every `router_probe_interval` (60 s), or its neighbour GC drops the entry. So when some entry is
unusable, the routes are dumped too: the unusable gateways of routes better than the one the
kernel chose for a backend (more specific, or a lower metric) are probed on every refresh, and
the backend's `Link.bypassed` names the best of them until the kernel takes that route again
(the cache refreshes at `retry_s` meanwhile), so that a link that comes back is used again at
once instead of a minute later.

The I/O is sans-IO: `_resolve_steps` yields batches of netlink requests and takes the replies,
and two small drivers run it on a blocking socket (`resolve_links_sync`) or on the event loop
(`resolve_links`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import ipaddress
import logging
import os
import socket
import struct
import subprocess
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

from flowstate.errors import UsageError

__all__ = [
    "Link",
    "NeighbourCache",
    "disable_offloads",
    "interface_info",
    "resolve_links",
    "resolve_links_sync",
]

log = logging.getLogger("flowstate.forwarder.neigh")

AddressLike: TypeAlias = bytes | str | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Link:
    """How to reach one backend on Ethernet; all-empty (`resolved` False) when not known now."""

    ifindex: int = 0
    """Egress interface index (0: unresolved)."""
    ifname: str = ""
    src_mac: bytes = b""
    """The egress interface's MAC (6 bytes), or b"" when unresolved."""
    dst_mac: bytes = b""
    """The next hop's MAC (6 bytes), or b"" when unresolved."""
    mtu: int = 0
    """The egress MTU: the interface's, lowered by a route MTU or a learnt path MTU."""
    next_hop: bytes = b""
    """The gateway's address, or the backend's own when it is on link (kept when unresolved)."""
    reason: str = ""
    """Why the link is unresolved ("" when resolved), e.g. "neighbour INCOMPLETE"."""
    bypassed: bytes = b""
    """The gateway of a better route the kernel passed over because its neighbour entry is
    unusable (FAILED: the link or the gateway was down), probed on every refresh; b"" if none."""

    @property
    def resolved(self) -> bool:
        return bool(self.dst_mac)


# ---- rtnetlink wire format (linux/netlink.h, linux/rtnetlink.h, linux/neighbour.h) ------------

NETLINK_ROUTE = 0
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x01, 0x02, 0x04
NLM_F_REPLACE, NLM_F_CREATE, NLM_F_DUMP = 0x100, 0x400, 0x300
RTM_NEWLINK, RTM_GETLINK = 16, 18
RTM_NEWROUTE, RTM_GETROUTE = 24, 26
RTM_NEWNEIGH, RTM_GETNEIGH = 28, 30
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_METRICS, RTA_MULTIPATH = 1, 4, 5, 6, 8, 9
RTA_TABLE, RTA_VIA = 15, 18
RTAX_MTU = 2
RTN_UNICAST, RTN_LOCAL = 1, 2
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_EXT_MASK = 1, 3, 4, 29
RTEXT_FILTER_SKIP_STATS = 1 << 3
ARPHRD_ETHER = 1
NDA_DST, NDA_LLADDR = 1, 2
NTF_USE, NTF_PROXY = 0x01, 0x08
NUD_INCOMPLETE, NUD_REACHABLE, NUD_STALE, NUD_DELAY = 0x01, 0x02, 0x04, 0x08
NUD_PROBE, NUD_FAILED, NUD_NOARP, NUD_PERMANENT = 0x10, 0x20, 0x40, 0x80
#: States whose link-layer address can be used now.
NUD_VALID = NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_NOARP | NUD_PERMANENT
_NUD_NAMES = {
    NUD_INCOMPLETE: "INCOMPLETE",
    NUD_REACHABLE: "REACHABLE",
    NUD_STALE: "STALE",
    NUD_DELAY: "DELAY",
    NUD_PROBE: "PROBE",
    NUD_FAILED: "FAILED",
    NUD_NOARP: "NOARP",
    NUD_PERMANENT: "PERMANENT",
}

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_RTATTR = struct.Struct("=HH")  # len, type
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, proto, scope, type
_NDMSG = struct.Struct("=BxxxiHBB")  # family, ifindex, state, flags, type
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_RTNEXTHOP = struct.Struct("=HBBi")  # len, flags, hops, ifindex
_U32 = struct.Struct("=I")
#: Requests per datagram: their replies (~1 KiB of socket buffer each) must fit the default
#: receive buffer, or the kernel drops them (ENOBUFS).
_BATCH = 64
#: A netlink message is never larger than 32 KiB (the kernel caps dump skbs there).
_RECV_SIZE = 1 << 16
#: How long the kernel may take to answer a batch; it answers in microseconds.
_TIMEOUT_S = 2.0


def _attr(kind: int, data: bytes) -> bytes:
    length = _RTATTR.size + len(data)
    return _RTATTR.pack(length, kind) + data + bytes(-length % 4)


def _attrs(buf: bytes, offset: int) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    while offset + _RTATTR.size <= len(buf):
        length, kind = _RTATTR.unpack_from(buf, offset)
        if length < _RTATTR.size or offset + length > len(buf):
            break
        found[kind & 0x3FFF] = buf[offset + _RTATTR.size : offset + length]
        offset += (length + 3) & ~3
    return found


def _messages(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, seq, payload) of each netlink message in a datagram."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            break
        yield kind, flags, seq, data[offset + _NLMSGHDR.size : offset + length]
        offset += (length + 3) & ~3


@dataclass(frozen=True, slots=True)
class _Request:
    kind: int
    flags: int
    body: bytes

    @property
    def is_dump(self) -> bool:
        """Answered by many messages and NLMSG_DONE (else by one message or NLMSG_ERROR)."""
        return self.kind % 4 == 2 and self.flags & NLM_F_DUMP == NLM_F_DUMP  # RTM_GET*


@dataclass(slots=True)
class _Reply:
    error: int = 0  # errno, 0 if none
    messages: list[tuple[int, bytes]] = field(default_factory=list)


class _Batch:
    """One datagram of requests and the bookkeeping of their replies (sans-IO)."""

    def __init__(self, requests: Sequence[_Request], first_seq: int) -> None:
        self.seqs = [first_seq + i for i in range(len(requests))]
        self.payload = b"".join(
            _NLMSGHDR.pack(_NLMSGHDR.size + len(r.body), r.kind, r.flags, seq, 0) + r.body
            for seq, r in zip(self.seqs, requests, strict=True)
        )
        self._dump = {seq for seq, r in zip(self.seqs, requests, strict=True) if r.is_dump}
        self._pending = set(self.seqs)
        self._replies = {seq: _Reply() for seq in self.seqs}

    @property
    def done(self) -> bool:
        return not self._pending

    def feed(self, data: bytes) -> None:
        for kind, _flags, seq, payload in _messages(data):
            if seq not in self._pending:
                continue  # a late answer to an abandoned batch
            reply = self._replies[seq]
            if kind in (NLMSG_ERROR, NLMSG_DONE):
                code = struct.unpack_from("=i", payload)[0] if len(payload) >= 4 else 0
                reply.error = -code if code < 0 else 0
                self._pending.discard(seq)
            else:
                reply.messages.append((kind, payload))
                if seq not in self._dump:
                    self._pending.discard(seq)

    def replies(self) -> list[_Reply]:
        return [self._replies[seq] for seq in self.seqs]


class _Netlink:
    """An rtnetlink socket that runs request batches, blocking or on the event loop."""

    def __init__(self, *, blocking: bool) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        try:
            self.sock.bind((0, 0))
            if blocking:
                self.sock.settimeout(_TIMEOUT_S)
            else:
                self.sock.setblocking(False)
        except BaseException:
            self.sock.close()
            raise
        self._seq = int.from_bytes(os.urandom(3), "little")

    def _batches(self, requests: Sequence[_Request]) -> list[_Batch]:
        batches = []
        for start in range(0, len(requests), _BATCH):
            chunk = requests[start : start + _BATCH]
            batches.append(_Batch(chunk, self._seq))
            self._seq = (self._seq + len(chunk)) & 0xFFFFFFFF
        return batches

    def exchange(self, requests: Sequence[_Request]) -> list[_Reply]:
        replies: list[_Reply] = []
        for batch in self._batches(requests):
            self.sock.send(batch.payload)
            while not batch.done:
                batch.feed(self.sock.recv(_RECV_SIZE))
            replies += batch.replies()
        return replies

    async def exchange_async(self, requests: Sequence[_Request]) -> list[_Reply]:
        loop = asyncio.get_running_loop()
        replies: list[_Reply] = []
        for batch in self._batches(requests):
            await loop.sock_sendall(self.sock, batch.payload)
            while not batch.done:
                batch.feed(
                    await asyncio.wait_for(loop.sock_recv(self.sock, _RECV_SIZE), _TIMEOUT_S)
                )
            replies += batch.replies()
        return replies

    def close(self) -> None:
        self.sock.close()


def _route_get(address: bytes) -> _Request:
    body = _RTMSG.pack(socket.AF_INET6, 128, 0, 0, 0, 0, 0, 0, 0) + _attr(RTA_DST, address)
    return _Request(RTM_GETROUTE, NLM_F_REQUEST, body)


def _link_get(ifindex: int) -> _Request:
    body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, ifindex, 0, 0)
    body += _attr(IFLA_EXT_MASK, _U32.pack(RTEXT_FILTER_SKIP_STATS))
    return _Request(RTM_GETLINK, NLM_F_REQUEST, body)


def _neigh_dump() -> _Request:
    return _Request(
        RTM_GETNEIGH, NLM_F_REQUEST | NLM_F_DUMP, _NDMSG.pack(socket.AF_INET6, 0, 0, 0, 0)
    )


def _route_dump() -> _Request:
    body = _RTMSG.pack(socket.AF_INET6, 0, 0, 0, 0, 0, 0, 0, 0)
    return _Request(RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP, body)


def _neigh_probe(ifindex: int, address: bytes) -> _Request:
    """`ip -6 neigh replace ADDR dev IF use`: create the entry if needed and resolve it now."""
    body = _NDMSG.pack(socket.AF_INET6, ifindex, 0, NTF_USE, 0) + _attr(NDA_DST, address)
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
    return _Request(RTM_NEWNEIGH, flags, body)


@dataclass(frozen=True, slots=True)
class _Route:
    ifindex: int
    next_hop: bytes
    mtu: int  # 0: none on the route
    table: int = 0  # the routing table the kernel's answer came from


def _table(payload: bytes, attrs: dict[int, bytes]) -> int:
    if len(attrs.get(RTA_TABLE, b"")) == 4:
        return int(_U32.unpack(attrs[RTA_TABLE])[0])
    return int(_RTMSG.unpack_from(payload)[4])


def _parse_route(reply: _Reply, address: bytes) -> _Route | str:
    if reply.error:
        return f"no route: {os.strerror(reply.error)}"
    for kind, payload in reply.messages:
        if kind != RTM_NEWROUTE or len(payload) < _RTMSG.size:
            continue
        route_type = _RTMSG.unpack_from(payload)[7]
        if route_type == RTN_LOCAL:
            return "address is local to this host"
        if route_type != RTN_UNICAST:
            return f"route type {route_type} is not unicast"
        attrs = _attrs(payload, _RTMSG.size)
        if RTA_VIA in attrs:
            return "next hop is not IPv6"
        if RTA_OIF not in attrs:
            return "route has no output interface"
        metrics = _attrs(attrs.get(RTA_METRICS, b""), 0)
        mtu = _U32.unpack(metrics[RTAX_MTU])[0] if len(metrics.get(RTAX_MTU, b"")) == 4 else 0
        oif = _U32.unpack(attrs[RTA_OIF])[0]
        return _Route(oif, attrs.get(RTA_GATEWAY, address), mtu, _table(payload, attrs))
    return "no route in the kernel's answer"


@dataclass(frozen=True, slots=True)
class _FibRoute:
    """A unicast IPv6 route of the routing tables (a route dump's entry)."""

    table: int
    dst: int  # the prefix, as an integer
    dst_len: int
    metric: int
    next_hops: tuple[tuple[int, bytes], ...]  # (ifindex, gateway or b"" when on link)

    def covers(self, address: bytes) -> bool:
        shift = 128 - self.dst_len
        return int.from_bytes(address, "big") >> shift == self.dst >> shift

    def better_than(self, other: _FibRoute) -> bool:
        """Preferred by the kernel's lookup when both are usable (longest prefix, then metric)."""
        return (self.dst_len, -self.metric) > (other.dst_len, -other.metric)


def _parse_next_hops(attrs: dict[int, bytes]) -> tuple[tuple[int, bytes], ...]:
    if RTA_MULTIPATH not in attrs:
        if len(attrs.get(RTA_OIF, b"")) != 4:
            return ()
        return ((_U32.unpack(attrs[RTA_OIF])[0], attrs.get(RTA_GATEWAY, b"")),)
    hops = []
    data, offset = attrs[RTA_MULTIPATH], 0
    while offset + _RTNEXTHOP.size <= len(data):
        length, _flags, _hops, ifindex = _RTNEXTHOP.unpack_from(data, offset)
        if length < _RTNEXTHOP.size or offset + length > len(data):
            break
        nested = _attrs(data[offset : offset + length], _RTNEXTHOP.size)
        hops.append((ifindex, nested.get(RTA_GATEWAY, b"")))
        offset += (length + 3) & ~3
    return tuple(hops)


def _parse_fib(reply: _Reply) -> list[_FibRoute]:
    """The unicast routes of an IPv6 route dump (source-specific ones left out); none if the
    dump failed (the links found so far stand, only skipped routes go unnoticed this round)."""
    if reply.error:
        log.warning("route dump failed: %s", os.strerror(reply.error))
        return []
    routes = []
    for kind, payload in reply.messages:
        if kind != RTM_NEWROUTE or len(payload) < _RTMSG.size:
            continue
        family, dst_len, src_len = _RTMSG.unpack_from(payload)[:3]
        route_type = _RTMSG.unpack_from(payload)[7]
        if family != socket.AF_INET6 or route_type != RTN_UNICAST or src_len or dst_len > 128:
            continue
        attrs = _attrs(payload, _RTMSG.size)
        dst = attrs.get(RTA_DST, bytes(16))
        metric = (
            _U32.unpack(attrs[RTA_PRIORITY])[0] if len(attrs.get(RTA_PRIORITY, b"")) == 4 else 0
        )
        hops = _parse_next_hops(attrs)
        if len(dst) == 16 and hops:
            prefix = int.from_bytes(dst, "big")
            routes.append(_FibRoute(_table(payload, attrs), prefix, dst_len, metric, hops))
    return routes


def _bypassed(
    address: bytes,
    route: _Route,
    fib: list[_FibRoute],
    unusable: set[tuple[int, bytes]],
) -> list[tuple[int, bytes]]:
    """The unusable gateways of the routes better than the one the kernel chose for `address`,
    best route first: those the kernel's lookup skipped (a host that does not forward passes
    over a route whose gateway's neighbour entry is FAILED)."""
    covering = [f for f in fib if f.table == route.table and f.covers(address)]

    def chosen(f: _FibRoute) -> bool:
        return any(
            oif == route.ifindex and (gw or address) == route.next_hop for oif, gw in f.next_hops
        )

    taken = [f for f in covering if chosen(f)]
    if not taken:  # the routes changed since the lookup: next refresh
        return []
    best = max(taken, key=lambda f: (f.dst_len, -f.metric))
    skipped = sorted(
        (f for f in covering if f.better_than(best)), key=lambda f: (-f.dst_len, f.metric)
    )
    found: list[tuple[int, bytes]] = []
    for f in skipped:
        for hop in f.next_hops:
            if hop[1] and hop in unusable and hop not in found:
                found.append(hop)
    return found


def _parse_link(reply: _Reply) -> tuple[str, bytes, int] | str:
    if reply.error:
        return f"interface: {os.strerror(reply.error)}"
    for kind, payload in reply.messages:
        if kind != RTM_NEWLINK or len(payload) < _IFINFOMSG.size:
            continue
        _family, hw_type, _index, _flags, _change = _IFINFOMSG.unpack_from(payload)
        attrs = _attrs(payload, _IFINFOMSG.size)
        name = attrs.get(IFLA_IFNAME, b"").split(b"\0", 1)[0].decode(errors="replace")
        mac = attrs.get(IFLA_ADDRESS, b"")
        if hw_type != ARPHRD_ETHER or len(mac) != 6:
            return f"interface {name} is not Ethernet"
        mtu = _U32.unpack(attrs[IFLA_MTU])[0] if len(attrs.get(IFLA_MTU, b"")) == 4 else 0
        return name, mac, mtu
    return "interface missing from the kernel's answer"


def _parse_neighbours(reply: _Reply) -> dict[tuple[int, bytes], tuple[int, bytes]]:
    """(ifindex, address) -> (NUD state, link-layer address) of every IPv6 neighbour entry."""
    if reply.error:
        raise OSError(reply.error, f"neighbour dump: {os.strerror(reply.error)}")
    table: dict[tuple[int, bytes], tuple[int, bytes]] = {}
    for kind, payload in reply.messages:
        if kind != RTM_NEWNEIGH or len(payload) < _NDMSG.size:
            continue
        family, ifindex, state, flags, _type = _NDMSG.unpack_from(payload)
        if family != socket.AF_INET6 or flags & NTF_PROXY:
            continue
        attrs = _attrs(payload, _NDMSG.size)
        if NDA_DST in attrs:
            table[(ifindex, attrs[NDA_DST])] = (state, attrs.get(NDA_LLADDR, b""))
    return table


def _state_name(state: int) -> str:
    return "|".join(name for bit, name in _NUD_NAMES.items() if state & bit) or "NONE"


_Steps = Generator[list[_Request], list[_Reply], dict[bytes, Link]]


def _resolve_steps(addresses: Sequence[bytes], probe: bool) -> _Steps:
    """Route lookups, then links and neighbours, then the routes if a neighbour entry is
    unusable, then probes; returns every address's Link."""
    if not addresses:
        return {}
    route_replies = yield [_route_get(a) for a in addresses]
    routes = {a: _parse_route(r, a) for a, r in zip(addresses, route_replies, strict=True)}
    ifindexes = sorted({r.ifindex for r in routes.values() if isinstance(r, _Route)})
    *link_replies, neigh_reply = yield [*(_link_get(i) for i in ifindexes), _neigh_dump()]
    interfaces = {i: _parse_link(r) for i, r in zip(ifindexes, link_replies, strict=True)}
    neighbours = _parse_neighbours(neigh_reply)

    links: dict[bytes, Link] = {}
    to_probe: set[tuple[int, bytes]] = set()
    for address, route in routes.items():
        if isinstance(route, str):
            links[address] = Link(reason=route)
            continue
        interface = interfaces[route.ifindex]
        if isinstance(interface, str):
            links[address] = Link(next_hop=route.next_hop, reason=interface)
            continue
        ifname, src_mac, if_mtu = interface
        state, lladdr = neighbours.get((route.ifindex, route.next_hop), (0, b""))
        if not state & NUD_VALID or state & NUD_STALE:
            to_probe.add((route.ifindex, route.next_hop))
        if state & NUD_VALID and len(lladdr) == 6:
            mtu = min(if_mtu, route.mtu) if route.mtu else if_mtu
            links[address] = Link(route.ifindex, ifname, src_mac, lladdr, mtu, route.next_hop)
        else:
            if (route.ifindex, route.next_hop) not in neighbours:
                what = "missing"
            elif not state & NUD_VALID:
                what = _state_name(state)
            else:
                what = f"{_state_name(state)} without a link-layer address"
            links[address] = Link(next_hop=route.next_hop, reason=f"neighbour {what}")

    # A better route whose gateway's entry is unusable may have been skipped: find those
    # gateways (only if there is such an entry besides the next hops in use, probed above).
    chosen = {(r.ifindex, r.next_hop): r for r in routes.values() if isinstance(r, _Route)}
    unusable = {key for key, (state, _) in neighbours.items() if not state & NUD_VALID}
    if unusable - set(chosen):
        [fib_reply] = yield [_route_dump()]
        fib = _parse_fib(fib_reply)
        for address, route in routes.items():
            if not isinstance(route, _Route):
                continue
            skipped = _bypassed(address, route, fib, unusable)
            if skipped:
                links[address] = dataclasses.replace(links[address], bypassed=skipped[0][1])
                to_probe.update(skipped)
    if probe and to_probe:
        probe_replies = yield [_neigh_probe(i, a) for i, a in sorted(to_probe)]
        for (ifindex, target), reply in zip(sorted(to_probe), probe_replies, strict=True):
            if reply.error:
                log.debug(
                    "neighbour probe %s dev %d: %s",
                    ipaddress.IPv6Address(target),
                    ifindex,
                    os.strerror(reply.error),
                )
    return links


def _packed(address: AddressLike) -> bytes:
    try:
        return ipaddress.IPv6Address(address).packed
    except ValueError as exc:
        raise UsageError(f"backend address {address!r} is not IPv6: {exc}") from None


def _unique(addresses: Iterable[AddressLike]) -> list[bytes]:
    return list(dict.fromkeys(_packed(a) for a in addresses))


def resolve_links_sync(
    addresses: Iterable[AddressLike], *, probe: bool = True
) -> dict[bytes, Link]:
    """The egress `Link` of each backend address (keys: packed 16-byte addresses).

    Unresolved addresses map to a `Link` with `resolved` False and a `reason`; with `probe`, the
    kernel is asked to resolve (or re-confirm) their next hop, for a later call to find.
    Raises `OSError` if rtnetlink fails as a whole (the per-address errors are reasons).
    """
    steps = _resolve_steps(_unique(addresses), probe)
    netlink = _Netlink(blocking=True)
    try:
        replies: list[_Reply] | None = None
        while True:
            try:
                requests = next(steps) if replies is None else steps.send(replies)
            except StopIteration as finished:
                result: dict[bytes, Link] = finished.value
                return result
            replies = netlink.exchange(requests)
    finally:
        netlink.close()


async def resolve_links(
    addresses: Iterable[AddressLike], *, probe: bool = True
) -> dict[bytes, Link]:
    """`resolve_links_sync` on the event loop: the same answers, never blocking the loop."""
    steps = _resolve_steps(_unique(addresses), probe)
    netlink = _Netlink(blocking=False)
    try:
        replies: list[_Reply] | None = None
        while True:
            try:
                requests = next(steps) if replies is None else steps.send(replies)
            except StopIteration as finished:
                result: dict[bytes, Link] = finished.value
                return result
            replies = await netlink.exchange_async(requests)
    finally:
        netlink.close()


class NeighbourCache:
    """The links of a set of backends, refreshed periodically; reports what changed.

    `refresh()` returns `{address: Link}` for each backend whose link differs from the previous
    refresh (all of them the first time); an unresolved backend gets an all-empty `Link`, so the
    caller can hand every change to `engine.set_backend(id, ip, dst_mac=..., src_mac=...,
    ifindex=..., mtu=...)` as is (empty link info: DROP_NO_ROUTE). `run()` refreshes every
    `refresh_s`, after `retry_s` while a backend is unresolved (a probe is usually answered in
    milliseconds), and at once after `request_refresh()`.
    """

    def __init__(
        self,
        addresses: Iterable[AddressLike] = (),
        *,
        refresh_s: float = 5.0,
        retry_s: float = 0.5,
        probe: bool = True,
    ) -> None:
        if refresh_s <= 0 or retry_s <= 0:
            raise UsageError("refresh_s and retry_s must be positive")
        self.refresh_s = refresh_s
        self.retry_s = retry_s
        self.probe = probe
        self._addresses = _unique(addresses)
        self._links: dict[bytes, Link] = {}
        self._wake: asyncio.Event | None = None  # made by run(), on its event loop

    @property
    def addresses(self) -> list[bytes]:
        return list(self._addresses)

    def set_addresses(self, addresses: Iterable[AddressLike]) -> None:
        """Replace the backend set (config reload); new ones are reported on the next refresh."""
        self._addresses = _unique(addresses)
        self._links = {a: link for a, link in self._links.items() if a in self._addresses}
        self.request_refresh()

    def link(self, address: AddressLike) -> Link | None:
        """The last known link of `address` (None before its first refresh)."""
        return self._links.get(_packed(address))

    def links(self) -> dict[bytes, Link]:
        return dict(self._links)

    def request_refresh(self) -> None:
        """Make `run()` refresh now (e.g. when DROP_NO_ROUTE counts go up); loop thread only."""
        if self._wake is not None:
            self._wake.set()

    def next_refresh_s(self) -> float:
        """`retry_s` while a backend is unresolved or routed around an unusable gateway (its
        probe is usually answered in milliseconds once the gateway is back), else `refresh_s`."""
        degraded = any(not link.resolved or link.bypassed for link in self._links.values())
        return self.retry_s if degraded else self.refresh_s

    def _apply(self, links: dict[bytes, Link]) -> dict[bytes, Link]:
        changed = {a: link for a, link in links.items() if self._links.get(a) != link}
        for address, link in changed.items():
            before = self._links.get(address)
            if link.bypassed and (before is None or before.bypassed != link.bypassed):
                log.warning(
                    "backend %s: the kernel routes around gateway %s (neighbour unusable): "
                    "probing it on every refresh",
                    ipaddress.IPv6Address(address),
                    ipaddress.IPv6Address(link.bypassed),
                )
        self._links.update(changed)
        return changed

    async def refresh(self) -> dict[bytes, Link]:
        """Re-resolve every backend; returns those whose link changed."""
        addresses = list(self._addresses)
        links = await resolve_links(addresses, probe=self.probe)
        if addresses != self._addresses:  # set_addresses() ran meanwhile
            links = {a: link for a, link in links.items() if a in self._addresses}
        return self._apply(links)

    def refresh_sync(self) -> dict[bytes, Link]:
        return self._apply(resolve_links_sync(self._addresses, probe=self.probe))

    async def run(self, on_change: Callable[[dict[bytes, Link]], object]) -> None:
        """Refresh forever, calling `on_change` with each non-empty change set."""
        wake = self._wake = asyncio.Event()
        while True:
            wake.clear()
            try:
                changed = await self.refresh()
            except OSError as exc:
                log.warning("neighbour refresh failed: %s", exc)
                changed = {}
            if changed:
                on_change(changed)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), self.next_refresh_s())


# ---- interfaces ------------------------------------------------------------------------------

SIOCGIFMTU, SIOCGIFHWADDR, SIOCGIFINDEX = 0x8921, 0x8927, 0x8933


def interface_info(ifname: str) -> tuple[int, bytes, int]:
    """(ifindex, MAC, MTU) of `ifname` in the calling thread's network namespace.

    Raises `OSError` (ENODEV) if there is no such interface.
    """
    if not 0 < len(ifname.encode()) < 16:
        raise UsageError(f"interface name {ifname!r} is not 1..15 bytes")
    request = struct.pack("16s16x", ifname.encode())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        ifindex = struct.unpack_from("=i", fcntl.ioctl(sock, SIOCGIFINDEX, request), 16)[0]
        mac = fcntl.ioctl(sock, SIOCGIFHWADDR, request)[18:24]
        mtu = struct.unpack_from("=i", fcntl.ioctl(sock, SIOCGIFMTU, request), 16)[0]
    return ifindex, bytes(mac), mtu


#: ethtool feature keywords turned off on capture interfaces, and their names in `ethtool -k`.
OFFLOADS = {
    "gro": "generic-receive-offload",
    "lro": "large-receive-offload",
    "rx-gro-hw": "rx-gro-hw",
    "gso": "generic-segmentation-offload",
    "tso": "tcp-segmentation-offload",
}


def disable_offloads(ifname: str, *, ethtool: str = "ethtool") -> dict[str, bool]:
    """Turn off receive/segmentation offloads of a capture interface, one feature at a time.

    GRO/LRO would hand the forwarder merged packets larger than the MTU. A feature the device
    lacks or cannot change is tolerated; returns `{feature: still on}` as `ethtool -k` reports
    after the change (a fixed feature may stay on). Raises `OSError` if ethtool cannot run
    or the interface does not exist. Blocking: call it at start-up, not on the event loop.
    """
    for keyword in OFFLOADS:
        done = subprocess.run(
            [ethtool, "-K", ifname, keyword, "off"], capture_output=True, text=True, check=False
        )
        if done.returncode and "no such device" in done.stderr.lower():
            raise OSError(errno.ENODEV, f"{ifname}: {done.stderr.strip()}")
    shown = subprocess.run([ethtool, "-k", ifname], capture_output=True, text=True, check=False)
    if shown.returncode:
        raise OSError(errno.ENODEV, f"ethtool -k {ifname}: {shown.stderr.strip()}")
    state: dict[str, bool] = {}
    for line in shown.stdout.splitlines():
        name, _, value = line.strip().partition(": ")
        if name in OFFLOADS.values():
            state[name] = value.startswith("on")
    return state
