"""Golden packet table of the data path: input frames and the exact verdicts, bytes and events
both engines (C and Python) must produce, against one fixed engine set-up (`golden_engine`).

Expected outputs are built here from the frame builders of `forwarder.packet` and hand-packed
outer headers, and backends from `flowstate.flow.FiveTuple.hash64` and the tables below — never
by running an engine. Each case is `setup` steps, one `main` process call, then `after` steps;
every step's result is checked.
"""

from __future__ import annotations

import ipaddress
import struct
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flowstate.flow import FiveTuple, Proto
from forwarder.packet import (
    ETH_P_8021AD,
    ETH_P_8021Q,
    ETH_P_ARP,
    ETH_P_IP,
    ETH_P_IPV6,
    IP4_DF,
    IP4_MF,
    IPPROTO_DSTOPTS,
    IPPROTO_FRAGMENT,
    IPPROTO_HOPOPTS,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_ROUTING,
    IPPROTO_TCP,
    IPPROTO_UDP,
    MAC_CLIENT_SIDE,
    MAC_FORWARDER,
    MISS_ICMP,
    MISS_PACKET,
    REPLY,
    TCP_ACK,
    TCP_FIN,
    TCP_PSH,
    TCP_RST,
    TCP_SYN,
    TP_STATUS_CSUMNOTREADY,
    Event,
    Verdict,
    eth,
    frame,
    icmp4_error,
    icmp6_error,
    ip6_frag,
    ip6_opts,
    ipv4,
    ipv6,
    tcp,
    udp,
    vlan,
)

FlowT = tuple[int, bytes, int, bytes, int]
MissT = tuple[int, FlowT, bytes, int]


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


# --- the fixed engine set-up ---------------------------------------------------------------------

SOURCE = ip("2001:db8:f0::1")
VIP4 = ip("192.0.2.10")
VIP6 = ip("2001:db8:a::10")
CLIENT4 = ip("198.51.100.7")
CLIENT6 = ip("2001:db8:c::7")
OTHER4 = ip("192.0.2.99")  # not a VIP
OTHER6 = ip("2001:db8:a::99")
ROUTER4 = ip("203.0.113.1")  # sends ICMP errors about our flows
ROUTER6 = ip("2001:db8:e::1")

VIPS: dict[int, tuple[bytes, int, int]] = {
    0: (VIP4, 80, IPPROTO_TCP),
    1: (VIP4, 53, IPPROTO_UDP),
    2: (VIP6, 443, IPPROTO_TCP),
    3: (VIP6, 53, IPPROTO_UDP),
}
BACKENDS = {b: ip(f"2001:db8:b::{b}") for b in (1, 2, 3)}
CAPACITY = 64
N_BUCKETS = CAPACITY // 8
T0 = 1_000_000
TCP_IDLE, UDP_IDLE, FIN_LINGER, TOUCH = 60_000, 30_000, 2_000, 10_000
TUNNEL_MTU = 1500
CSUM = TP_STATUS_CSUMNOTREADY


def round_robin(backend_ids: Sequence[int], size: int) -> list[int]:
    """A stand-in Maglev table: backend ids in turn (the engine only consumes the entries)."""
    return [backend_ids[i % len(backend_ids)] for i in range(size)]


TABLES: dict[int, list[int]] = {
    0: round_robin([1, 2, 3], 13),
    1: round_robin([2, 3, 1], 11),
    2: round_robin([3, 1, 2], 13),
    3: round_robin([1, 3], 7),
}


def table_bytes(entries: Sequence[int]) -> bytes:
    return array("H", entries).tobytes()


def golden_engine(cls: Callable[..., Any]) -> Any:
    """The one engine set-up every case starts from."""
    engine = cls(
        source_ipv6=SOURCE,
        capacity=CAPACITY,
        tcp_idle_ms=TCP_IDLE,
        udp_idle_ms=UDP_IDLE,
        fin_linger_ms=FIN_LINGER,
        touch_interval_ms=TOUCH,
        tunnel_mtu=TUNNEL_MTU,
    )
    for vip_id, (vip_ip, port, proto) in VIPS.items():
        engine.set_vip(vip_id, vip_ip, port, proto)
    for backend_id, address in BACKENDS.items():
        engine.set_backend(backend_id, address)
    for vip_id, entries in TABLES.items():
        engine.set_maglev(vip_id, table_bytes(entries))
    return engine


def normalised(result: Any) -> tuple[Any, ...]:
    """A `process`/`forward_to` result as plain values, to compare the two engines' outputs."""
    return (
        bytes(result.verdicts),
        [(int(d), bytes(p)) for d, p in result.tx],
        [(int(v), tuple(fl), bytes(f), int(k)) for v, fl, f, k in result.misses],
        [(int(e), tuple(fl), int(b)) for e, fl, b in result.events],
    )


# --- case structure ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Process:
    """One `process` call and everything it must return."""

    frames: tuple[bytes, ...]
    verdicts: tuple[Verdict, ...]
    now_ms: int = T0
    statuses: tuple[int, ...] | None = None
    tx: tuple[tuple[int, bytes], ...] = ()
    misses: tuple[MissT, ...] = ()
    events: tuple[tuple[int, FlowT, int], ...] = ()
    forward_to: int | None = None
    """Not None: the call is `forward_to(frames, forward_to)` instead of `process`."""


@dataclass(frozen=True)
class Call:
    """An engine method call and its expected return value."""

    method: str
    args: tuple[Any, ...]
    returns: Any = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)


Step = Process | Call


@dataclass(frozen=True)
class GoldenCase:
    description: str
    main: Process
    setup: tuple[Step, ...] = ()
    after: tuple[Step, ...] = ()
    stats: Mapping[str, int] = field(default_factory=dict)
    """Expected values of table counters (`flows`, `evicted`, `expired`) at the end."""

    @property
    def single(self) -> bool:
        """One frame in the main call: the truncation test runs on it."""
        return len(self.main.frames) == 1

    @property
    def frame(self) -> bytes:
        return self.main.frames[0]

    @property
    def status(self) -> int:
        return self.main.statuses[0] if self.main.statuses else 0

    @property
    def now_ms(self) -> int:
        return self.main.now_ms

    @property
    def expected_verdict(self) -> Verdict:
        return self.main.verdicts[0]

    @property
    def expected_tx(self) -> list[tuple[int, bytes]]:
        return list(self.main.tx)

    @property
    def expected_misses(self) -> list[MissT]:
        return list(self.main.misses)

    @property
    def expected_events(self) -> list[tuple[int, FlowT, int]]:
        return list(self.main.events)


# --- expectations, computed without an engine ----------------------------------------------------


def hash64(flow: FlowT) -> int:
    return FiveTuple(Proto(flow[0]), *flow[1:]).hash64()


def vip_of(flow: FlowT) -> int:
    return next(v for v, t in VIPS.items() if t == (flow[3], flow[4], flow[0]))


def pick(flow: FlowT, table: Sequence[int] | None = None) -> int:
    """The backend Maglev gives a flow start (DATAPATH.md: `table[hash64 % len]`)."""
    entries = TABLES[vip_of(flow)] if table is None else table
    return entries[hash64(flow) % len(entries)]


def encap(backend_id: int, inner: bytes, flow: FlowT) -> tuple[int, bytes]:
    """The tx item for `inner` tunnelled to `backend_id`: the outer header packed by hand."""
    if inner[0] >> 4 == 4:
        next_header, tclass = 4, inner[1]
    else:
        next_header, tclass = 41, ((inner[0] & 0x0F) << 4) | (inner[1] >> 4)
    label = (hash64(flow) >> 32) & 0xFFFFF
    first_word = (6 << 28) | (tclass << 20) | label
    outer = struct.pack("!IHBB", first_word, len(inner), next_header, 64)
    return backend_id, outer + SOURCE + BACKENDS[backend_id] + inner


def l3(eth_frame: bytes) -> bytes:
    """The IP packet inside a frame built by `frame()` (tags skipped, padding trimmed)."""
    off = 14
    while eth_frame[off - 2 : off] in (b"\x81\x00", b"\x88\xa8"):
        off += 4
    if eth_frame[off] >> 4 == 4:
        return eth_frame[off : off + struct.unpack_from("!H", eth_frame, off + 2)[0]]
    return eth_frame[off : off + 40 + struct.unpack_from("!H", eth_frame, off + 4)[0]]


# --- packet shorthands ---------------------------------------------------------------------------


def flow4(cport: int = 40000, vport: int = 80, proto: int = IPPROTO_TCP) -> FlowT:
    return (proto, CLIENT4, cport, VIP4, vport)


def flow6(cport: int = 40000, vport: int = 443, proto: int = IPPROTO_TCP) -> FlowT:
    return (proto, CLIENT6, cport, VIP6, vport)


def tcp4(
    cport: int = 40000,
    flags: int = TCP_ACK,
    *,
    vport: int = 80,
    dst: bytes = VIP4,
    tos: int = 0,
    payload: bytes = b"",
    partial: bool = False,
    ip_options: bytes = b"",
    flags_frag: int = IP4_DF,
) -> bytes:
    segment = tcp(CLIENT4, dst, cport, vport, flags=flags, payload=payload, partial=partial)
    return ipv4(
        CLIENT4,
        dst,
        segment,
        proto=IPPROTO_TCP,
        tos=tos,
        options=ip_options,
        flags_frag=flags_frag,
    )


def tcp6(
    cport: int = 40000,
    flags: int = TCP_ACK,
    *,
    vport: int = 443,
    dst: bytes = VIP6,
    tc: int = 0,
    payload: bytes = b"",
    ext: bytes = b"",
    first_nh: int = IPPROTO_TCP,
) -> bytes:
    segment = tcp(CLIENT6, dst, cport, vport, flags=flags, payload=payload)
    return ipv6(CLIENT6, dst, ext + segment, nh=first_nh, tc=tc, flow_label=0x12345)


def udp4(cport: int = 50000, payload: bytes = b"query", *, partial: bool = False) -> bytes:
    return ipv4(
        CLIENT4, VIP4, udp(CLIENT4, VIP4, cport, 53, payload, partial=partial), proto=IPPROTO_UDP
    )


def udp6(cport: int = 50000, payload: bytes = b"query", *, partial: bool = False) -> bytes:
    segment = udp(CLIENT6, VIP6, cport, 53, payload, partial=partial)
    return ipv6(CLIENT6, VIP6, segment, nh=IPPROTO_UDP)


def syn_step(packet: bytes, flow: FlowT, now: int = T0, **frame_kw: Any) -> Process:
    """A flow start that must be NEW, tunnelled to its Maglev pick."""
    f = frame(packet, **frame_kw)
    backend = pick(flow)
    return Process(
        (f,),
        (Verdict.NEW,),
        now,
        tx=(encap(backend, packet, flow),),
        events=((Event.NEW, flow, backend),),
    )


def fwd_step(
    packet: bytes,
    flow: FlowT,
    now: int,
    events: tuple[tuple[int, FlowT, int], ...] = (),
    backend: int | None = None,
) -> Process:
    """A table hit that must be FORWARD to the flow's backend."""
    b = pick(flow) if backend is None else backend
    return Process(
        (frame(packet),), (Verdict.FORWARD,), now, tx=(encap(b, packet, flow),), events=events
    )


def miss_step(
    packet_or_frame: bytes, flow: FlowT, now: int = T0, kind: int = MISS_PACKET
) -> Process:
    f = packet_or_frame if packet_or_frame[0] == MAC_FORWARDER[0] else frame(packet_or_frame)
    return Process((f,), (Verdict.MISS,), now, misses=((vip_of(flow), flow, f, kind),))


def verdict_step(f: bytes, verdict: Verdict, now: int = T0, status: int = 0) -> Process:
    return Process((f,), (verdict,), now, statuses=(status,) if status else None)


def lookup(flow: FlowT, returns: tuple[int, int, int] | None) -> Call:
    return Call("lookup", (flow,), returns)


def case(
    description: str, main: Process, *setup: Step, after: Sequence[Step] = (), **stats: int
) -> GoldenCase:
    return GoldenCase(description, main, tuple(setup), tuple(after), stats)


def _mix64(k: int) -> int:
    """MurmurHash3's 64-bit finalizer (DATAPATH.md "Flow table": the second bucket)."""
    mask = (1 << 64) - 1
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & mask
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & mask
    return k ^ (k >> 33)


def buckets(flow: FlowT) -> tuple[int, int]:
    """A flow's candidate buckets (b1, b2) in the golden table."""
    h = hash64(flow)
    return h % N_BUCKETS, (_mix64(h) * N_BUCKETS) >> 64


def same_bucket_ports(
    flow_of: Callable[[int], FlowT], count: int, start: int = 41000, *, two: bool = False
) -> list[int]:
    """Client ports whose flows have the same candidate buckets: one bucket (b1 == b2: 8 slots
    of their own), or with `two` one pair b1 != b2 (16 slots)."""
    by_pair: dict[tuple[int, int], list[int]] = {}
    port = start
    while True:
        pair = buckets(flow_of(port))
        if (pair[0] != pair[1]) == two:
            ports = by_pair.setdefault(pair, [])
            ports.append(port)
            if len(ports) == count:
                return ports
        port += 1


def port_in_bucket(flow_of: Callable[[int], FlowT], bucket: int, start: int = 45000) -> int:
    """A client port whose flow has `bucket` as both candidates."""
    port = start
    while buckets(flow_of(port)) != (bucket, bucket):
        port += 1
    return port


def zero_sum_payload(make: Callable[[bytes], bytes], at: int) -> bytes:
    """2 payload bytes that make the checksum of `make(payload)` (field at `at`) come out 0."""
    segment = make(b"\x00\x00")
    # With the right word w the sum over everything (checksum field 0) is 0xFFFF.
    field_value = struct.unpack_from("!H", segment, at)[0]
    partial = (~field_value) & 0xFFFF  # the sum of everything else
    return struct.pack("!H", (0xFFFF - partial) % 0xFFFF or 0xFFFF)


# --- the cases -----------------------------------------------------------------------------------

A, S, F, R, P = TCP_ACK, TCP_SYN, TCP_FIN, TCP_RST, TCP_PSH
ICMP_MTU = TUNNEL_MTU - 40


def _flow_starts() -> list[GoldenCase]:
    f4, f6 = flow4(), flow6()
    u4, u6 = flow4(50000, 53, IPPROTO_UDP), flow6(50000, 53, IPPROTO_UDP)
    out = [
        case(
            "tcp syn v4: NEW, encapsulated to the Maglev pick, TOS kept as traffic class",
            syn_step(tcp4(flags=S, tos=0xB8), f4),
            after=[lookup(f4, (pick(f4), 1, T0 + TCP_IDLE))],
            flows=1,
        ),
        case(
            "tcp syn v6: NEW, traffic class kept, outer flow label from the flow hash",
            syn_step(tcp6(flags=S, tc=0x4A), f6),
            after=[lookup(f6, (pick(f6), 1, T0 + TCP_IDLE))],
        ),
        case(
            "tcp syn with FIN/RST bits and no ACK is still a flow start",
            syn_step(tcp4(40001, S | F | R), flow4(40001)),
        ),
        case(
            "tcp syn with options and payload (data offset 8)",
            syn_step(
                ipv4(
                    CLIENT4,
                    VIP4,
                    tcp(CLIENT4, VIP4, 40002, 80, flags=S, options=bytes(12), payload=b"TFO"),
                    proto=IPPROTO_TCP,
                ),
                flow4(40002),
            ),
        ),
        case(
            "udp first datagram v4: NEW with UDP idle",
            syn_step(udp4(), u4),
            after=[lookup(u4, (pick(u4), 1, T0 + UDP_IDLE))],
        ),
        case("udp first datagram v6: NEW", syn_step(udp6(), u6)),
        case(
            "udp second datagram: FORWARD, expiry pushed by the UDP idle time",
            fwd_step(udp4(), u4, T0 + 500),
            syn_step(udp4(), u4),
            after=[lookup(u4, (pick(u4), 1, T0 + 500 + UDP_IDLE))],
        ),
        case(
            "one tagged VLAN: NEW, the tunnelled packet has no tag",
            syn_step(tcp4(40003, S), flow4(40003), vlans=(100,)),
        ),
        case(
            "0x88a8 tag then 0x8100 tag (QinQ): NEW",
            Process(
                (
                    eth(ETH_P_8021AD)
                    + vlan(10, ETH_P_8021Q)
                    + vlan(20, ETH_P_IPV6)
                    + tcp6(40004, S),
                ),
                (Verdict.NEW,),
                tx=(encap(pick(flow6(40004)), tcp6(40004, S), flow6(40004)),),
                events=((Event.NEW, flow6(40004), pick(flow6(40004))),),
            ),
        ),
        case(
            "60-byte frame holding a 28-byte UDP packet: padding trimmed from the tunnel",
            syn_step(udp4(50001, b""), flow4(50001, 53, IPPROTO_UDP), pad_to=60),
        ),
        case(
            "IPv6 hop-by-hop + routing + destination options before TCP: NEW",
            syn_step(
                tcp6(
                    40005,
                    S,
                    ext=ip6_opts(IPPROTO_ROUTING, 1)
                    + ip6_opts(IPPROTO_DSTOPTS)
                    + ip6_opts(IPPROTO_TCP, 2),
                    first_nh=IPPROTO_HOPOPTS,
                ),
                flow6(40005),
            ),
        ),
        case(
            "IPv6 chain of exactly 8 extension headers: NEW",
            syn_step(tcp6(40006, S, ext=_ext_chain(8), first_nh=IPPROTO_DSTOPTS), flow6(40006)),
        ),
        case(
            "IPv4 first fragment (MF, offset 0) with the whole TCP header: NEW",
            syn_step(tcp4(40007, S, payload=b"x" * 16, flags_frag=IP4_MF), flow4(40007)),
        ),
        case(
            "IPv6 first fragment (offset 0, M) with the whole TCP header: NEW",
            syn_step(
                tcp6(
                    40008,
                    S,
                    payload=b"y" * 16,
                    ext=ip6_frag(IPPROTO_TCP, 0, more=True),
                    first_nh=IPPROTO_FRAGMENT,
                ),
                flow6(40008),
            ),
        ),
        case(
            "tunnelled packet of exactly tunnel_mtu bytes: forwarded",
            syn_step(tcp4(40009, S, payload=b"z" * (TUNNEL_MTU - 40 - 40)), flow4(40009)),
        ),
        case(
            "a batch: SYN, ARP, data, FIN of one flow in one call",
            _batch_case(),
        ),
    ]
    for ihl in range(6, 16):
        options = b"\x01" * ((ihl - 5) * 4 - 1) + b"\x00"  # NOPs, end of list
        port = 40100 + ihl
        out.append(
            case(
                f"IPv4 with options (IHL {ihl}): NEW, options tunnelled unchanged",
                syn_step(tcp4(port, S, ip_options=options), flow4(port)),
            )
        )
    return out


def _ext_chain(n: int) -> bytes:
    """`n` destination-options headers, the last one followed by TCP."""
    return b"".join(ip6_opts(IPPROTO_DSTOPTS if i + 1 < n else IPPROTO_TCP) for i in range(n))


def _batch_case() -> Process:
    fl = flow4(40010)
    b = pick(fl)
    syn, data, fin = tcp4(40010, S), tcp4(40010, A | P, payload=b"GET /"), tcp4(40010, F | A)
    arp = eth(ETH_P_ARP, dst=b"\xff" * 6) + bytes(28)
    return Process(
        (frame(syn), arp, frame(data), frame(fin)),
        (Verdict.NEW, Verdict.PASS_NOT_IP, Verdict.FORWARD, Verdict.FORWARD),
        tx=(encap(b, syn, fl), encap(b, data, fl), encap(b, fin, fl)),
        events=((Event.NEW, fl, b), (Event.CLOSE, fl, b)),
    )


def _lifecycle() -> list[GoldenCase]:
    f4, f6 = flow4(), flow6()
    b4 = pick(f4)
    syn4, syn6 = syn_step(tcp4(flags=S), f4), syn_step(tcp6(flags=S), f6)
    other_backend = next(b for b in BACKENDS if b != b4)
    # A table holding b4 in which f4's new pick is `other_backend`.
    keeps_b4 = [other_backend, b4] if hash64(f4) % 2 == 0 else [b4, other_backend]
    new_pick4 = Process(
        (frame(tcp4(flags=S)),),
        (Verdict.NEW,),
        T0 + 500,
        tx=(encap(other_backend, tcp4(flags=S), f4),),
        events=((Event.NEW, f4, other_backend),),
    )
    u4 = flow4(50000, 53, IPPROTO_UDP)
    return [
        case(
            "established hit v4: FORWARD, expiry pushed, no event before touch is due",
            fwd_step(tcp4(flags=A | P, payload=b"hello"), f4, T0 + 1_000),
            syn4,
            after=[lookup(f4, (b4, 1, T0 + 1_000 + TCP_IDLE))],
        ),
        case(
            "SYN retransmit on an established entry whose backend is still in the VIP's table:"
            " plain FORWARD to the pinned backend, not the new pick",
            fwd_step(tcp4(flags=S), f4, T0 + 300),
            syn4,
            Call("set_maglev", (0, table_bytes(keeps_b4))),
            Call("maglev_pick", (0, hash64(f4)), other_backend),
            after=[lookup(f4, (b4, 1, T0 + 300 + TCP_IDLE))],
        ),
        case(
            "SYN on an established entry whose backend left the VIP's table (down, drained;"
            " port reuse): re-created by a new Maglev pick",
            new_pick4,
            syn4,
            fwd_step(tcp4(flags=A | P, payload=b"x"), f4, T0 + 100),
            Call("set_maglev", (0, table_bytes([other_backend]))),
            after=[
                lookup(f4, (other_backend, 1, T0 + 500 + TCP_IDLE)),
                fwd_step(tcp4(flags=S), f4, T0 + 600, backend=other_backend),
            ],
            flows=1,
        ),
        case(
            "SYN on an established entry whose backend is only in another VIP's table: re-created",
            new_pick4,
            syn4,
            Call("set_maglev", (2, table_bytes([b4]))),
            Call("set_maglev", (0, table_bytes([other_backend]))),
            after=[lookup(f4, (other_backend, 1, T0 + 500 + TCP_IDLE))],
            flows=1,
        ),
        case(
            "SYN+ACK on an established entry whose backend left the VIP's table: FORWARD to it",
            fwd_step(tcp4(flags=S | A), f4, T0 + 300),
            syn4,
            Call("set_maglev", (0, table_bytes([other_backend]))),
            after=[lookup(f4, (b4, 1, T0 + 300 + TCP_IDLE))],
        ),
        case(
            "ACK on an established entry whose backend left the VIP's table: FORWARD to it",
            fwd_step(tcp4(flags=A), f4, T0 + 300),
            syn4,
            Call("set_maglev", (0, table_bytes([other_backend]))),
            after=[lookup(f4, (b4, 1, T0 + 300 + TCP_IDLE))],
        ),
        case(
            "SYN on an established entry, the VIP with no backend left: DROP_NO_BACKEND,"
            " entry untouched",
            verdict_step(frame(tcp4(flags=S)), Verdict.DROP_NO_BACKEND, T0 + 500),
            syn4,
            Call("set_maglev", (0, b"")),
            after=[lookup(f4, (b4, 1, T0 + TCP_IDLE))],
        ),
        case(
            "UDP datagram of a flow whose backend left the VIP's table: FORWARD to it",
            fwd_step(udp4(), u4, T0 + 300),
            syn_step(udp4(), u4),
            Call("set_maglev", (1, table_bytes([next(b for b in BACKENDS if b != pick(u4))]))),
            after=[lookup(u4, (pick(u4), 1, T0 + 300 + UDP_IDLE))],
        ),
        case("non-SYN packet of an unknown flow v4: MISS", miss_step(tcp4(), f4)),
        case(
            "SYN+ACK of an unknown flow: MISS (not a flow start)", miss_step(tcp4(flags=S | A), f4)
        ),
        case("non-SYN packet of an unknown flow v6: MISS", miss_step(tcp6(flags=A | P), f6)),
        case(
            "miss of a padded frame: the whole frame, padding included, is returned",
            miss_step(frame(tcp4(flags=A), pad_to=64), f4),
        ),
        case(
            "FIN: FORWARD, CLOSE event, entry CLOSING with the linger time",
            fwd_step(tcp4(flags=F | A), f4, T0 + 500, ((Event.CLOSE, f4, b4),)),
            syn4,
            after=[lookup(f4, (b4, 2, T0 + 500 + FIN_LINGER))],
        ),
        case(
            "RST v6: FORWARD, CLOSE event",
            fwd_step(tcp6(flags=R), f6, T0 + 700, ((Event.CLOSE, f6, pick(f6)),)),
            syn6,
            after=[lookup(f6, (pick(f6), 2, T0 + 700 + FIN_LINGER))],
        ),
        case(
            "touch due: FORWARD with TOUCH, then not again until the next interval",
            fwd_step(tcp4(), f4, T0 + TOUCH, ((Event.TOUCH, f4, b4),)),
            syn4,
            fwd_step(tcp4(), f4, T0 + TOUCH - 1),
            after=[
                fwd_step(tcp4(), f4, T0 + 2 * TOUCH - 1),
                fwd_step(tcp4(), f4, T0 + 2 * TOUCH, ((Event.TOUCH, f4, b4),)),
            ],
        ),
        case(
            "CLOSING entry: forwarded but not extended, FIN again gives no event",
            fwd_step(tcp4(flags=F | A), f4, T0 + 1_000),
            syn4,
            fwd_step(tcp4(flags=F | A), f4, T0 + 100, ((Event.CLOSE, f4, b4),)),
            after=[
                lookup(f4, (b4, 2, T0 + 100 + FIN_LINGER)),
                miss_step(tcp4(), f4, T0 + 100 + FIN_LINGER),
            ],
        ),
        case(
            "SYN on a CLOSING entry (port reuse): re-created by a new Maglev pick",
            Process(
                (frame(tcp4(flags=S)),),
                (Verdict.NEW,),
                T0 + 500,
                tx=(encap(other_backend, tcp4(flags=S), f4),),
                events=((Event.NEW, f4, other_backend),),
            ),
            syn4,
            fwd_step(tcp4(flags=R), f4, T0 + 100, ((Event.CLOSE, f4, b4),)),
            Call("set_maglev", (0, table_bytes([other_backend]))),
            after=[lookup(f4, (other_backend, 1, T0 + 500 + TCP_IDLE))],
            flows=1,
        ),
        case(
            "SYN on a CLOSING entry with no backend left: DROP_NO_BACKEND, entry untouched",
            verdict_step(frame(tcp4(flags=S)), Verdict.DROP_NO_BACKEND, T0 + 500),
            syn4,
            fwd_step(tcp4(flags=F), f4, T0 + 100, ((Event.CLOSE, f4, b4),)),
            Call("set_maglev", (0, b"")),
            after=[lookup(f4, (b4, 2, T0 + 100 + FIN_LINGER))],
        ),
        case(
            "expiry: entry with expires_ms == now is a miss; expire() returns it",
            miss_step(tcp4(), f4, T0 + 2 * TCP_IDLE - 1),
            syn4,
            fwd_step(tcp4(), f4, T0 + TCP_IDLE - 1, ((Event.TOUCH, f4, b4),)),
            after=[
                lookup(f4, (b4, 1, T0 + 2 * TCP_IDLE - 1)),
                Call("expire", (T0 + 2 * TCP_IDLE - 2, CAPACITY), []),
                Call("expire", (T0 + 2 * TCP_IDLE - 1, CAPACITY), [f4]),
                lookup(f4, None),
            ],
            flows=0,
            expired=1,
        ),
        case(
            "an expired slot is reused by the next flow start of its bucket",
            syn_step(tcp4(flags=S), f4, T0 + TCP_IDLE + 5),
            syn4,
            after=[lookup(f4, (b4, 1, T0 + TCP_IDLE + 5 + TCP_IDLE))],
            flows=1,
            expired=0,
        ),
        case(
            "install: ESTABLISHED with no event, then its packets FORWARD to that backend",
            fwd_step(tcp4(), f4, T0 + 10, backend=other_backend),
            Call("install", (f4, other_backend, T0)),
            lookup(f4, (other_backend, 1, T0 + TCP_IDLE)),
            after=[lookup(f4, (other_backend, 1, T0 + 10 + TCP_IDLE))],
            flows=1,
        ),
        case(
            "install overwrites a CLOSING entry as ESTABLISHED",
            fwd_step(tcp4(), f4, T0 + 300, backend=3),
            syn4,
            fwd_step(tcp4(flags=F), f4, T0 + 100, ((Event.CLOSE, f4, b4),)),
            Call("install", (f4, 3, T0 + 200)),
            after=[lookup(f4, (3, 1, T0 + 300 + TCP_IDLE))],
            flows=1,
        ),
        case(
            "remove_backend drops its flows: their packets miss",
            miss_step(tcp4(), f4, T0 + 10),
            syn4,
            Call("remove_backend", (b4,), 1),
            Call("remove_backend", (b4,), 0),
            flows=0,
        ),
        case(
            "remove_vip drops its flows; the address stays a VIP while another VIP uses it",
            verdict_step(frame(tcp4()), Verdict.PASS_NOT_SERVICE, T0 + 10),
            syn4,
            Call("remove_vip", (0,), 1),
            Call("maglev_pick", (0, 0), -1),
            after=[
                Call("remove_vip", (1,), 0),
                verdict_step(frame(tcp4()), Verdict.PASS_NOT_VIP, T0 + 20),
                Call("remove_vip", (1,), 0),
            ],
            flows=0,
        ),
        case(
            "maglev_pick agrees with the table; unknown backends and 0xFFFF are no backend",
            syn_step(tcp6(flags=S), f6),
            Call("maglev_pick", (2, hash64(f6)), pick(f6)),
            Call("maglev_pick", (2, 14), TABLES[2][1]),
            Call("set_maglev", (3, table_bytes([0xFFFF, 9]))),
            Call("maglev_pick", (3, 0), -1),
            Call("maglev_pick", (3, 1), -1),
        ),
    ]


def _quote4(
    cport: int = 40000, *, src: bytes = VIP4, proto: int = IPPROTO_TCP, sport: int = 80
) -> bytes:
    """What a router quotes of a VIP → client IPv4 packet: its header and 8 bytes of L4."""
    if proto == IPPROTO_UDP:
        l4 = udp(src, CLIENT4, sport, cport, b"answer")
    else:
        l4 = tcp(src, CLIENT4, sport, cport, flags=S | A, payload=b"x" * 32)
    return ipv4(src, CLIENT4, l4, proto=proto)[:28]


def _quote6(
    cport: int = 40000, *, src: bytes = VIP6, ext: bytes = b"", first_nh: int = IPPROTO_TCP
) -> bytes:
    """A VIP → client IPv6 packet as an ICMPv6 error quotes it (whole: it is small)."""
    segment = tcp(src, CLIENT6, 443, cport, flags=A, payload=b"y" * 64)
    return ipv6(src, CLIENT6, ext + segment, nh=first_nh)


def _icmp4(quote: bytes, *, type_: int = 3, code: int = 4, tos: int = 0) -> bytes:
    return ipv4(
        ROUTER4, VIP4, icmp4_error(type_, code, quote, rest=1400), proto=IPPROTO_ICMP, tos=tos
    )


def _icmp6(quote: bytes, *, type_: int = 2, code: int = 0, tc: int = 0) -> bytes:
    message = icmp6_error(ROUTER6, VIP6, type_, code, quote, rest=1280)
    return ipv6(ROUTER6, VIP6, message, nh=IPPROTO_ICMPV6, tc=tc)


def _icmp_cases() -> list[GoldenCase]:
    f4, f6, u4 = flow4(), flow6(), flow4(50000, 53, IPPROTO_UDP)
    b4, b6 = pick(f4), pick(f6)
    syn4, syn6 = syn_step(tcp4(flags=S), f4), syn_step(tcp6(flags=S), f6)
    bad = Verdict.DROP_ICMP_BAD_QUOTE
    short = Verdict.DROP_ICMP_SHORT
    quote9 = _quote6(
        ext=b"".join(ip6_opts(IPPROTO_DSTOPTS) for _ in range(8)) + ip6_opts(IPPROTO_TCP),
        first_nh=IPPROTO_DSTOPTS,
    )
    icmp_v4_in_v6 = ipv6(ROUTER6, VIP6, icmp4_error(3, 4, _quote4()), nh=IPPROTO_ICMP)
    return [
        case(
            "ICMP frag-needed about a known flow: FORWARD to its backend, quoted flow's label",
            Process(
                (frame(_icmp4(_quote4(), tos=0xC0)),),
                (Verdict.FORWARD,),
                T0 + 50,
                tx=(encap(b4, _icmp4(_quote4(), tos=0xC0), f4),),
            ),
            syn4,
            after=[lookup(f4, (b4, 1, T0 + TCP_IDLE))],
        ),
        case(
            "ICMP unreachable (any code) quoting a packet with IP options: FORWARD",
            Process(
                (frame(_icmp4(_options_quote(), code=1)),),
                (Verdict.FORWARD,),
                T0 + 50,
                tx=(encap(b4, _icmp4(_options_quote(), code=1), f4),),
            ),
            syn4,
        ),
        case(
            "ICMP frag-needed about a UDP flow: FORWARD; CSUMNOTREADY ignored for ICMP",
            Process(
                (frame(_icmp4(_quote4(50000, proto=IPPROTO_UDP, sport=53))),),
                (Verdict.FORWARD,),
                T0 + 50,
                statuses=(CSUM,),
                tx=(encap(pick(u4), _icmp4(_quote4(50000, proto=IPPROTO_UDP, sport=53)), u4),),
            ),
            syn_step(udp4(), u4),
        ),
        case(
            "ICMP frag-needed about an unknown flow: MISS marked MISS_ICMP, nothing created",
            miss_step(_icmp4(_quote4()), f4, kind=MISS_ICMP),
            after=[lookup(f4, None)],
            flows=0,
        ),
        case(
            "ICMPv6 packet-too-big about an unknown flow: MISS marked MISS_ICMP",
            miss_step(_icmp6(_quote6()), f6, kind=MISS_ICMP),
        ),
        case(
            "ICMP about a UDP flow unknown to a lookup-first VIP: MISS marked MISS_ICMP",
            miss_step(_icmp4(_quote4(50000, proto=IPPROTO_UDP, sport=53)), u4, kind=MISS_ICMP),
            _lookup_first(1),
        ),
        case(
            "ICMPv6 unreachable about a known flow, quote with hop-by-hop: FORWARD",
            Process(
                (
                    frame(
                        _icmp6(
                            _quote6(ext=ip6_opts(IPPROTO_TCP), first_nh=IPPROTO_HOPOPTS),
                            type_=1,
                            tc=0x11,
                        )
                    ),
                ),
                (Verdict.FORWARD,),
                T0 + 50,
                tx=(
                    encap(
                        b6,
                        _icmp6(
                            _quote6(ext=ip6_opts(IPPROTO_TCP), first_nh=IPPROTO_HOPOPTS),
                            type_=1,
                            tc=0x11,
                        ),
                        f6,
                    ),
                ),
            ),
            syn6,
            after=[lookup(f6, (b6, 1, T0 + TCP_IDLE))],
        ),
        case(
            "ICMP echo request to a VIP: PASS_NOT_SERVICE",
            verdict_step(
                frame(
                    ipv4(
                        CLIENT4, VIP4, icmp4_error(8, 0, b"ping", rest=0x10001), proto=IPPROTO_ICMP
                    )
                ),
                Verdict.PASS_NOT_SERVICE,
            ),
        ),
        case(
            "ICMPv6 echo request to a VIP: PASS_NOT_SERVICE",
            verdict_step(
                frame(
                    ipv6(
                        CLIENT6,
                        VIP6,
                        icmp6_error(CLIENT6, VIP6, 128, 0, b"ping", rest=1),
                        nh=IPPROTO_ICMPV6,
                    )
                ),
                Verdict.PASS_NOT_SERVICE,
            ),
        ),
        case(
            "ICMP time exceeded (type 11): PASS_NOT_SERVICE",
            verdict_step(frame(_icmp4(_quote4(), type_=11, code=0)), Verdict.PASS_NOT_SERVICE),
        ),
        case(
            "ICMPv6 time exceeded (type 3): PASS_NOT_SERVICE",
            verdict_step(frame(_icmp6(_quote6(), type_=3)), Verdict.PASS_NOT_SERVICE),
        ),
        case(
            "ICMP quote about a VIP port not configured: PASS_NOT_SERVICE",
            verdict_step(frame(_icmp4(_quote4(sport=8080))), Verdict.PASS_NOT_SERVICE),
        ),
        case(
            "ICMP quote with the wrong source: BAD_QUOTE",
            verdict_step(frame(_icmp4(_quote4(src=OTHER4))), bad),
        ),
        case(
            "ICMP quote of an ICMP packet: BAD_QUOTE",
            verdict_step(frame(_icmp4(ipv4(VIP4, CLIENT4, bytes(8), proto=IPPROTO_ICMP))), bad),
        ),
        case(
            "ICMP quote with IP version 6: BAD_QUOTE", verdict_step(frame(_icmp4(_quote6())), bad)
        ),
        case(
            "ICMP quote with IHL 4: BAD_QUOTE",
            verdict_step(frame(_icmp4(b"\x44" + _quote4()[1:])), bad),
        ),
        case(
            "ICMPv6 quote with the wrong source: BAD_QUOTE",
            verdict_step(frame(_icmp6(_quote6(src=OTHER6))), bad),
        ),
        case(
            "ICMPv6 quote with 9 extension headers: BAD_QUOTE",
            verdict_step(frame(_icmp6(quote9)), bad),
        ),
        case(
            "ICMPv6 quote with IP version 4: BAD_QUOTE",
            verdict_step(frame(_icmp6(_quote4() + bytes(20))), bad),
        ),
        case(
            "ICMP of 4 bytes: DROP_ICMP_SHORT",
            verdict_step(
                frame(ipv4(ROUTER4, VIP4, b"\x08\x00\x00\x00", proto=IPPROTO_ICMP)), short
            ),
        ),
        case(
            "ICMP quote of 19 bytes: DROP_ICMP_SHORT",
            verdict_step(frame(_icmp4(_quote4()[:19])), short),
        ),
        case(
            "ICMP quote with 7 bytes of L4: DROP_ICMP_SHORT",
            verdict_step(frame(_icmp4(_quote4()[:27])), short),
        ),
        case(
            "ICMPv6 quote of 39 bytes: DROP_ICMP_SHORT",
            verdict_step(frame(_icmp6(_quote6()[:39])), short),
        ),
        case(
            "ICMPv6 quote with a truncated extension header: DROP_ICMP_SHORT",
            verdict_step(
                frame(_icmp6(_quote6(ext=ip6_opts(IPPROTO_TCP, 1), first_nh=IPPROTO_HOPOPTS)[:50])),
                short,
            ),
        ),
        case(
            "ICMPv6 quote with 7 bytes of L4: DROP_ICMP_SHORT",
            verdict_step(frame(_icmp6(_quote6()[:47])), short),
        ),
        case(
            "ICMPv6 header over IPv4 (proto 58): PASS_NOT_SERVICE",
            verdict_step(
                frame(ipv4(ROUTER4, VIP4, icmp4_error(2, 0, _quote4()), proto=IPPROTO_ICMPV6)),
                Verdict.PASS_NOT_SERVICE,
            ),
        ),
        case(
            "ICMP header over IPv6 (next header 1): PASS_NOT_SERVICE",
            verdict_step(frame(icmp_v4_in_v6), Verdict.PASS_NOT_SERVICE),
        ),
        case(
            "ICMP error that is itself too big: DROP_TOO_BIG (never answer ICMP with ICMP)",
            verdict_step(
                frame(
                    _icmp4(
                        ipv4(
                            VIP4,
                            CLIENT4,
                            tcp(VIP4, CLIENT4, 80, 40000, flags=A, payload=bytes(1420)),
                            proto=IPPROTO_TCP,
                        )
                    )
                ),
                Verdict.DROP_TOO_BIG,
                T0 + 50,
            ),
            syn4,
            after=[lookup(f4, (b4, 1, T0 + TCP_IDLE))],
        ),
    ]


def _options_quote() -> bytes:
    packet = ipv4(
        VIP4,
        CLIENT4,
        tcp(VIP4, CLIENT4, 80, 40000, flags=A),
        proto=IPPROTO_TCP,
        options=b"\x01\x01\x01\x00",
    )
    return packet[: 24 + 8]


def _raw_ip4(packet: bytes) -> bytes:
    """A frame with the IPv4 ethertype whatever the bytes (for malformed headers)."""
    return eth(ETH_P_IP) + packet


def _raw_ip6(packet: bytes) -> bytes:
    return eth(ETH_P_IPV6) + packet


def _drop_cases() -> list[GoldenCase]:
    V = Verdict
    good4, good6 = tcp4(flags=S), tcp6(flags=S)
    seg = tcp(CLIENT4, VIP4, 40000, 80, flags=S)
    v = verdict_step
    frag_ext = ip6_frag(IPPROTO_TCP, 185, more=True)
    return [
        case("frame of 13 bytes: DROP_ETH_SHORT", v(eth(ETH_P_IP)[:13], V.DROP_ETH_SHORT)),
        case(
            "VLAN tag cut short: DROP_ETH_SHORT",
            v(eth(ETH_P_8021Q) + b"\x00\x64", V.DROP_ETH_SHORT),
        ),
        case(
            "second VLAN tag cut short: DROP_ETH_SHORT",
            v(eth(ETH_P_8021AD) + vlan(1, ETH_P_8021Q) + b"\x00", V.DROP_ETH_SHORT),
        ),
        case("three VLAN tags: PASS_NOT_IP", v(frame(good4, vlans=(1, 2, 3)), V.PASS_NOT_IP)),
        case("ARP: PASS_NOT_IP", v(eth(ETH_P_ARP, dst=b"\xff" * 6) + bytes(28), V.PASS_NOT_IP)),
        case("19 bytes of IPv4 header: DROP_IP4_SHORT", v(_raw_ip4(good4[:19]), V.DROP_IP4_SHORT)),
        case(
            "IPv6 packet under the IPv4 ethertype: DROP_IP4_VERSION",
            v(_raw_ip4(good6), V.DROP_IP4_VERSION),
        ),
        case(
            "IPv4 IHL 4: DROP_IP4_IHL",
            v(frame(ipv4(CLIENT4, VIP4, seg, proto=IPPROTO_TCP, version_ihl=0x44)), V.DROP_IP4_IHL),
        ),
        case(
            "IPv4 IHL 15 beyond the packet: DROP_IP4_IHL",
            v(_raw_ip4(b"\x4f" + good4[1:40]), V.DROP_IP4_IHL),
        ),
        case(
            "IPv4 total length below IHL*4: DROP_IP4_LENGTH",
            v(
                frame(ipv4(CLIENT4, VIP4, seg, proto=IPPROTO_TCP, total_length=19)),
                V.DROP_IP4_LENGTH,
            ),
        ),
        case(
            "IPv4 total length beyond the frame: DROP_IP4_LENGTH",
            v(
                frame(ipv4(CLIENT4, VIP4, seg, proto=IPPROTO_TCP, total_length=41)),
                V.DROP_IP4_LENGTH,
            ),
        ),
        case("39 bytes of IPv6 header: DROP_IP6_SHORT", v(_raw_ip6(good6[:39]), V.DROP_IP6_SHORT)),
        case(
            "IPv4 packet under the IPv6 ethertype: DROP_IP6_VERSION",
            v(_raw_ip6(tcp4(flags=S, payload=bytes(20))), V.DROP_IP6_VERSION),
        ),
        case(
            "IPv6 payload length 0 (jumbogram): DROP_IP6_LENGTH",
            v(
                frame(ipv6(CLIENT6, VIP6, good6[40:], nh=IPPROTO_TCP, payload_length=0)),
                V.DROP_IP6_LENGTH,
            ),
        ),
        case(
            "IPv6 payload length beyond the frame: DROP_IP6_LENGTH",
            v(
                frame(ipv6(CLIENT6, VIP6, good6[40:], nh=IPPROTO_TCP, payload_length=21)),
                V.DROP_IP6_LENGTH,
            ),
        ),
        case(
            "IPv6 chain of 9 extension headers: DROP_IP6_EXT",
            v(frame(tcp6(40000, S, ext=_ext_chain(9), first_nh=IPPROTO_DSTOPTS)), V.DROP_IP6_EXT),
        ),
        case(
            "IPv6 extension header longer than the packet: DROP_IP6_EXT",
            v(
                frame(ipv6(CLIENT6, VIP6, ip6_opts(IPPROTO_TCP, 3)[:16], nh=IPPROTO_HOPOPTS)),
                V.DROP_IP6_EXT,
            ),
        ),
        case(
            "IPv6 fragment header cut short: DROP_IP6_EXT",
            v(
                frame(
                    ipv6(
                        CLIENT6,
                        VIP6,
                        ip6_opts(IPPROTO_FRAGMENT) + b"\x06\x00\x00\x00",
                        nh=IPPROTO_HOPOPTS,
                    )
                ),
                V.DROP_IP6_EXT,
            ),
        ),
        case(
            "IPv4 non-first fragment: DROP_FRAGMENT",
            v(
                frame(ipv4(CLIENT4, VIP4, b"z" * 64, proto=IPPROTO_TCP, flags_frag=IP4_MF | 185)),
                V.DROP_FRAGMENT,
            ),
        ),
        case(
            "IPv4 last fragment (no MF, offset > 0): DROP_FRAGMENT",
            v(frame(ipv4(CLIENT4, VIP4, seg, proto=IPPROTO_TCP, flags_frag=1)), V.DROP_FRAGMENT),
        ),
        case(
            "IPv6 non-first fragment: DROP_FRAGMENT",
            v(
                frame(ipv6(CLIENT6, VIP6, frag_ext + b"z" * 64, nh=IPPROTO_FRAGMENT)),
                V.DROP_FRAGMENT,
            ),
        ),
        case(
            "non-first fragment to a non-VIP address: PASS_NOT_VIP",
            v(
                frame(ipv4(CLIENT4, OTHER4, b"z" * 64, proto=IPPROTO_TCP, flags_frag=185)),
                V.PASS_NOT_VIP,
            ),
        ),
        case(
            "TCP header of 19 bytes: DROP_L4_SHORT",
            v(frame(ipv4(CLIENT4, VIP4, seg[:19], proto=IPPROTO_TCP)), V.DROP_L4_SHORT),
        ),
        case(
            "TCP data offset 4: DROP_L4_SHORT",
            v(
                frame(ipv4(CLIENT4, VIP4, seg[:12] + b"\x40" + seg[13:], proto=IPPROTO_TCP)),
                V.DROP_L4_SHORT,
            ),
        ),
        case(
            "TCP data offset beyond the packet: DROP_L4_SHORT",
            v(
                frame(ipv4(CLIENT4, VIP4, seg[:12] + b"\x60" + seg[13:], proto=IPPROTO_TCP)),
                V.DROP_L4_SHORT,
            ),
        ),
        case(
            "UDP of 7 bytes: DROP_L4_SHORT",
            v(
                frame(ipv4(CLIENT4, VIP4, udp(CLIENT4, VIP4, 5, 53)[:7], proto=IPPROTO_UDP)),
                V.DROP_L4_SHORT,
            ),
        ),
        case(
            "IPv6 TCP header of 12 bytes: DROP_L4_SHORT",
            v(frame(ipv6(CLIENT6, VIP6, good6[40:52], nh=IPPROTO_TCP)), V.DROP_L4_SHORT),
        ),
        case(
            "first fragment without the whole TCP header: DROP_L4_SHORT",
            v(
                frame(ipv4(CLIENT4, VIP4, seg[:12], proto=IPPROTO_TCP, flags_frag=IP4_MF)),
                V.DROP_L4_SHORT,
            ),
        ),
        case(
            "IPv4 to a non-VIP address: PASS_NOT_VIP",
            v(frame(tcp4(flags=S, dst=OTHER4)), V.PASS_NOT_VIP),
        ),
        case(
            "IPv6 to a non-VIP address: PASS_NOT_VIP",
            v(frame(tcp6(flags=S, dst=OTHER6)), V.PASS_NOT_VIP),
        ),
        case(
            "VIP, port not configured: PASS_NOT_SERVICE",
            v(frame(tcp4(flags=S, vport=81)), V.PASS_NOT_SERVICE),
        ),
        case(
            "IPv6 VIP, port not configured: PASS_NOT_SERVICE",
            v(frame(tcp6(flags=S, vport=80)), V.PASS_NOT_SERVICE),
        ),
        case(
            "UDP to a TCP-only VIP port: PASS_NOT_SERVICE",
            v(
                frame(ipv4(CLIENT4, VIP4, udp(CLIENT4, VIP4, 5000, 80), proto=IPPROTO_UDP)),
                V.PASS_NOT_SERVICE,
            ),
        ),
        case(
            "GRE to a VIP address: PASS_NOT_SERVICE",
            v(frame(ipv4(CLIENT4, VIP4, bytes(8), proto=47)), V.PASS_NOT_SERVICE),
        ),
        case(
            "IPv6 'no next header' to a VIP: PASS_NOT_SERVICE",
            v(frame(ipv6(CLIENT6, VIP6, ip6_opts(59), nh=IPPROTO_HOPOPTS)), V.PASS_NOT_SERVICE),
        ),
        case(
            "flow start with an empty Maglev table: DROP_NO_BACKEND",
            v(frame(good4), V.DROP_NO_BACKEND),
            Call("set_maglev", (0, b"")),
            flows=0,
        ),
        case(
            "UDP flow start with a table of 0xFFFF: DROP_NO_BACKEND",
            v(frame(udp4()), V.DROP_NO_BACKEND),
            Call("set_maglev", (1, table_bytes([0xFFFF] * 5))),
        ),
        case(
            "table naming an unconfigured backend: DROP_NO_BACKEND",
            v(frame(good6), V.DROP_NO_BACKEND),
            Call("set_maglev", (2, table_bytes([9]))),
        ),
    ]


def _too_big_reply4(inner: bytes, hlen: int = 20, tags: bytes = b"") -> bytes:
    """The expected answer to a too-big IPv4 packet, from the generic builders."""
    l2 = MAC_CLIENT_SIDE + MAC_FORWARDER + tags + struct.pack("!H", ETH_P_IP)
    icmp = icmp4_error(3, 4, inner[: hlen + 8], rest=ICMP_MTU)
    return l2 + ipv4(
        inner[16:20], inner[12:16], icmp, proto=IPPROTO_ICMP, ttl=64, ident=0, flags_frag=IP4_DF
    )


def _too_big_reply6(inner: bytes) -> bytes:
    l2 = MAC_CLIENT_SIDE + MAC_FORWARDER + struct.pack("!H", ETH_P_IPV6)
    vip, client = inner[24:40], inner[8:24]
    icmp = icmp6_error(vip, client, 2, 0, inner[:1232], rest=ICMP_MTU)
    return l2 + ipv6(vip, client, icmp, nh=IPPROTO_ICMPV6, hop_limit=64)


def _too_big_cases() -> list[GoldenCase]:
    f4 = flow4()
    b4 = pick(f4)
    big4 = tcp4(flags=A, payload=b"B" * (TUNNEL_MTU - 40 - 40 + 1))
    big6 = tcp6(flags=A, payload=b"C" * (TUNNEL_MTU - 40 - 60 + 1), tc=0x20)
    big_syn = tcp4(40001, flags=S, tos=0x10, payload=b"D" * 1500)
    opt4 = tcp4(40002, flags=A, payload=b"E" * 1500, ip_options=b"\x01\x01\x01\x00")
    partial = tcp4(40003, flags=A, payload=b"F" * 1500, partial=True)
    tag = vlan(7, ETH_P_IP)[:2]
    return [
        case(
            "too big v4: REPLY with ICMP frag-needed, exact bytes",
            Process((frame(big4),), (Verdict.REPLY_TOO_BIG,), tx=((REPLY, _too_big_reply4(big4)),)),
        ),
        case(
            "too big v6: REPLY with ICMPv6 packet-too-big quoting 1232 bytes",
            Process((frame(big6),), (Verdict.REPLY_TOO_BIG,), tx=((REPLY, _too_big_reply6(big6)),)),
        ),
        case(
            "too big SYN: REPLY, no flow created",
            Process(
                (frame(big_syn),), (Verdict.REPLY_TOO_BIG,), tx=((REPLY, _too_big_reply4(big_syn)),)
            ),
            after=[lookup(flow4(40001), None)],
            flows=0,
        ),
        case(
            "too big with IP options inside a VLAN: quote IHL*4 + 8, tag kept",
            Process(
                (frame(opt4, vlans=(7,)),),
                (Verdict.REPLY_TOO_BIG,),
                tx=((REPLY, _too_big_reply4(opt4, 24, struct.pack("!H", ETH_P_8021Q) + tag)),),
            ),
        ),
        case(
            "too big and CSUMNOTREADY: the quote holds the checksum as received",
            Process(
                (frame(partial),),
                (Verdict.REPLY_TOO_BIG,),
                statuses=(CSUM,),
                tx=((REPLY, _too_big_reply4(partial)),),
            ),
        ),
        case(
            "too big on an established flow: REPLY, entry not refreshed, no event",
            Process(
                (frame(big4),),
                (Verdict.REPLY_TOO_BIG,),
                T0 + TOUCH,
                tx=((REPLY, _too_big_reply4(big4)),),
            ),
            syn_step(tcp4(flags=S), f4),
            after=[lookup(f4, (b4, 1, T0 + TCP_IDLE))],
        ),
        case(
            "ICMP budget: 100 answers per process call, the 101st is DROP_TOO_BIG",
            Process(
                (frame(big4),) * 101,
                (Verdict.REPLY_TOO_BIG,) * 100 + (Verdict.DROP_TOO_BIG,),
                tx=((REPLY, _too_big_reply4(big4)),) * 100,
            ),
            after=[
                Process(
                    (frame(big4),), (Verdict.REPLY_TOO_BIG,), tx=((REPLY, _too_big_reply4(big4)),)
                )
            ],
        ),
    ]


def _checksum_cases() -> list[GoldenCase]:
    u6 = flow6(50000, 53, IPPROTO_UDP)
    f4, f6 = flow4(40020), flow6(40021)
    zero_udp = zero_sum_payload(lambda p: udp(CLIENT4, VIP4, 50002, 53, p), 6)
    zero_tcp = zero_sum_payload(lambda p: tcp(CLIENT4, VIP4, 40022, 80, flags=S, payload=p), 16)
    z4, zt = flow4(50002, 53, IPPROTO_UDP), flow4(40022)

    def new(partial_packet: bytes, full_packet: bytes, flow: FlowT) -> Process:
        b = pick(flow)
        return Process(
            (frame(partial_packet),),
            (Verdict.NEW,),
            statuses=(CSUM,),
            tx=(encap(b, full_packet, flow),),
            events=((Event.NEW, flow, b),),
        )

    ext = ip6_opts(IPPROTO_TCP)
    partial6 = ipv6(
        CLIENT6,
        VIP6,
        ext + tcp(CLIENT6, VIP6, 40021, 443, flags=S, payload=b"odd", partial=True),
        nh=IPPROTO_HOPOPTS,
    )
    full6 = ipv6(
        CLIENT6,
        VIP6,
        ext + tcp(CLIENT6, VIP6, 40021, 443, flags=S, payload=b"odd"),
        nh=IPPROTO_HOPOPTS,
    )
    return [
        case(
            "CSUMNOTREADY TCP v4: checksum completed in the tunnelled packet",
            new(tcp4(40020, S, payload=b"data", partial=True), tcp4(40020, S, payload=b"data"), f4),
        ),
        case(
            "CSUMNOTREADY UDP v6 (odd length): checksum completed",
            new(udp6(partial=True), udp6(), u6),
        ),
        case(
            "CSUMNOTREADY TCP v6 after a hop-by-hop header: checksum completed",
            new(partial6, full6, f6),
        ),
        case(
            "CSUMNOTREADY UDP summing to 0: sent as 0xFFFF",
            new(udp4(50002, zero_udp, partial=True), udp4(50002, zero_udp), z4),
        ),
        case(
            "CSUMNOTREADY TCP summing to 0: sent as 0x0000",
            new(
                ipv4(
                    CLIENT4,
                    VIP4,
                    tcp(CLIENT4, VIP4, 40022, 80, flags=S, payload=zero_tcp, partial=True),
                    proto=IPPROTO_TCP,
                ),
                ipv4(
                    CLIENT4,
                    VIP4,
                    tcp(CLIENT4, VIP4, 40022, 80, flags=S, payload=zero_tcp),
                    proto=IPPROTO_TCP,
                ),
                zt,
            ),
        ),
        case(
            "CSUMNOTREADY miss: the returned frame (VLAN, padding) carries the completed checksum",
            Process(
                (frame(tcp4(40020, A, partial=True), vlans=(5,), pad_to=70),),
                (Verdict.MISS,),
                statuses=(CSUM,),
                misses=((0, f4, frame(tcp4(40020, A), vlans=(5,), pad_to=70), MISS_PACKET),),
            ),
        ),
        case(
            "CSUMNOTREADY on an established flow's data: FORWARD with the completed checksum",
            Process(
                (frame(tcp4(40020, A | P, payload=b"abc", partial=True)),),
                (Verdict.FORWARD,),
                T0 + 5,
                statuses=(CSUM,),
                tx=(encap(pick(f4), tcp4(40020, A | P, payload=b"abc"), f4),),
            ),
            syn_step(tcp4(40020, S), f4),
        ),
        case(
            "CSUMNOTREADY to a non-VIP: PASS_NOT_VIP, nothing out",
            verdict_step(
                frame(tcp4(flags=S, dst=OTHER4, partial=True)), Verdict.PASS_NOT_VIP, status=CSUM
            ),
        ),
    ]


def _table_cases() -> list[GoldenCase]:
    ports = same_bucket_ports(flow4, 9)
    flows = [flow4(p) for p in ports]
    syns = [tcp4(p, S) for p in ports]
    fill = [syn_step(syns[i], flows[i], T0 + i) for i in range(8)]
    victim, last = flows[1], flows[8]
    fill_batch = Process(
        tuple(frame(s) for s in syns[:8]),
        (Verdict.NEW,) * 8,
        tx=tuple(encap(pick(fl), s, fl) for fl, s in zip(flows, syns[:8], strict=False)),
        events=tuple((Event.NEW, fl, pick(fl)) for fl in flows[:8]),
    )
    a, b = flow4(port_in_bucket(flow4, 5)), flow4(port_in_bucket(flow4, 5, 46000))
    c = flow4(port_in_bucket(flow4, 5, 47000))
    a_syn, b_syn, c_syn = (syn_step(tcp4(fl[2], S), fl) for fl in (a, b, c))
    return [
        case(
            "table full: a flow start evicts the least recently seen slot (EVICTED, then NEW)",
            Process(
                (frame(syns[8]),),
                (Verdict.NEW,),
                T0 + 20,
                tx=(encap(pick(last), syns[8], last),),
                events=((Event.EVICTED, victim, pick(victim)), (Event.NEW, last, pick(last))),
            ),
            *fill,
            fwd_step(tcp4(ports[0]), flows[0], T0 + 10),
            after=[lookup(victim, None), lookup(flows[0], (pick(flows[0]), 1, T0 + 10 + TCP_IDLE))],
            flows=8,
            evicted=1,
        ),
        case(
            "table full, every slot seen at once: the lowest slot index is evicted",
            Process(
                (frame(syns[8]),),
                (Verdict.NEW,),
                T0 + 1,
                tx=(encap(pick(last), syns[8], last),),
                events=((Event.EVICTED, flows[0], pick(flows[0])), (Event.NEW, last, pick(last))),
            ),
            fill_batch,
            after=[lookup(flows[0], None)],
            evicted=1,
        ),
        case(
            "install into a full bucket evicts silently (counted, no event)",
            fwd_step(tcp4(ports[8]), last, T0 + 30, backend=3),
            fill_batch,
            Call("install", (last, 3, T0 + 20)),
            after=[lookup(flows[0], None)],
            flows=8,
            evicted=1,
        ),
        case(
            "expire() walks slots in order from the hand: bucket 5 is slots 40..47",
            Process(
                (frame(tcp4(b[2], S)),),
                (Verdict.NEW,),
                T0 + 1,
                tx=b_syn.tx,
                events=b_syn.events,
            ),
            a_syn,
            after=[
                Call("expire", (T0 + TCP_IDLE + 1, 40), []),
                Call("expire", (T0 + TCP_IDLE + 1, 1), [a]),
                Call("expire", (T0 + TCP_IDLE + 1, 1), [b]),
                c_syn,  # the first free slot of bucket 5: slot 40; the hand is at 42
                Call("expire", (T0 + TCP_IDLE - 1, 1000), []),  # one full turn, back to 42
                Call("expire", (T0 + TCP_IDLE, 62), []),  # 42..63, 0..39
                Call("expire", (T0 + TCP_IDLE, 1), [c]),
            ],
            flows=0,
            expired=3,
        ),
        *_two_choice_cases(),
        *_epoch_cases(),
    ]


def _epoch_cases() -> list[GoldenCase]:
    """The table epoch (DATAPATH.md clarification 7): now stays within [epoch, epoch + 2**31)."""
    a, b, c, d = (flow4(p) for p in (40000, 40001, 40002, 40003))
    late = (1 << 31) + 5  # 2**31 past epoch 0: the epoch becomes late - 2**30
    far = (1 << 32) + 7  # epoch far - 2**30; back to T0: epoch 0
    near = far - (1 << 30) + 1
    return [
        case(
            "table epoch moves forward: a slot expired 2**30 ms before the new epoch is cleared "
            "unreported, a live one keeps its exact expiry",
            fwd_step(tcp4(40001), b, late, backend=3),
            syn_step(tcp4(40000, S), a),
            Call("install", (b, 3, late - 10)),
            after=[
                lookup(a, None),
                lookup(b, (3, 1, late + TCP_IDLE)),
                Call("expire", (late + 1, CAPACITY), []),
            ],
            flows=1,
            expired=0,
        ),
        case(
            "table epoch moves back with the clock: a slot expiring 2**32 ms or more after the "
            "new epoch is cleared, the others keep their exact expiry",
            miss_step(tcp4(40002), c, T0),
            Call("install", (c, 3, far)),
            Call("install", (d, 3, near)),
            after=[lookup(c, None), lookup(d, (3, 1, near + TCP_IDLE))],
            flows=1,
        ),
    ]


def _two_choice_cases() -> list[GoldenCase]:
    """Flows sharing one pair of candidate buckets b1 != b2: 16 slots between them."""
    ports = same_bucket_ports(flow4, 17, 42000, two=True)
    flows = [flow4(p) for p in ports]
    syns = [tcp4(p, S) for p in ports]
    b1, b2 = buckets(flows[0])
    late = T0 + TCP_IDLE + 1
    # Free slots 8/8: b1; then 7/8: b2; then 7/7: b1 ... so flows[2k] in b1, flows[2k+1] in b2.
    fill = [syn_step(syns[i], flows[i], T0 + i) for i in range(16)]
    fill_batch = Process(
        tuple(frame(s) for s in syns[:16]),
        (Verdict.NEW,) * 16,
        tx=tuple(encap(pick(fl), s, fl) for fl, s in zip(flows, syns[:16], strict=False)),
        events=tuple((Event.NEW, fl, pick(fl)) for fl in flows[:16]),
    )
    last = flows[16]

    def evicting(victim: FlowT, now: int) -> Process:
        return Process(
            (frame(syns[16]),),
            (Verdict.NEW,),
            now,
            tx=(encap(pick(last), syns[16], last),),
            events=((Event.EVICTED, victim, pick(victim)), (Event.NEW, last, pick(last))),
        )

    return [
        case(
            "two candidate buckets: a flow start takes the one with more free slots (ties: b1)",
            syn_step(syns[1], flows[1], T0 + 1),
            fill[0],
            after=[
                # expire() visits slots in order: flows[0] is in b1's slot 0, flows[1] in b2's.
                Call("expire", (late, b2 * 8), [flows[0]] if b1 < b2 else []),
                Call("expire", (late, 1), [flows[1]]),
                Call("expire", (late, CAPACITY), [flows[0]] if b1 > b2 else []),
            ],
            flows=0,
            expired=2,
        ),
        case(
            "both candidate buckets full: the least recently seen of the 16 slots is evicted "
            "(here in b2), and hits find flows in b2",
            evicting(flows[1], T0 + 30),
            *fill,
            fwd_step(tcp4(ports[0]), flows[0], T0 + 20),
            after=[
                lookup(flows[1], None),
                lookup(last, (pick(last), 1, T0 + 30 + TCP_IDLE)),
                fwd_step(tcp4(ports[15]), flows[15], T0 + 31),
            ],
            flows=16,
            evicted=1,
        ),
        case(
            "both candidate buckets full, every slot seen at once: b1's lowest slot is evicted",
            evicting(flows[0], T0 + 1),
            fill_batch,
            after=[lookup(flows[0], None), lookup(flows[1], (pick(flows[1]), 1, T0 + TCP_IDLE))],
            flows=16,
            evicted=1,
        ),
        case(
            "a CLOSING slot's LRU age is its last packet, not its close time minus the idle time",
            evicting(flows[2], T0 + 30),
            *fill,
            fwd_step(
                tcp4(ports[0], F | A), flows[0], T0 + 20, ((Event.CLOSE, flows[0], pick(flows[0])),)
            ),
            fwd_step(tcp4(ports[1]), flows[1], T0 + 21),
            after=[
                lookup(flows[0], (pick(flows[0]), 2, T0 + 20 + FIN_LINGER)),
                lookup(flows[2], None),
            ],
            flows=16,
            evicted=1,
        ),
        case(
            "a CLOSING slot seen again is younger than an ESTABLISHED one seen before",
            evicting(flows[1], T0 + 30),
            *fill,
            fwd_step(
                tcp4(ports[0], F | A), flows[0], T0 + 2, ((Event.CLOSE, flows[0], pick(flows[0])),)
            ),
            fwd_step(tcp4(ports[0]), flows[0], T0 + 25),
            *[fwd_step(tcp4(ports[i]), flows[i], T0 + 20) for i in range(2, 16)],
            after=[lookup(flows[0], (pick(flows[0]), 2, T0 + 2 + FIN_LINGER))],
            flows=16,
            evicted=1,
        ),
    ]


def _lookup_first(vip_id: int, on: bool = True) -> Call:
    """`set_vip` of a golden VIP again, with `udp_lookup_first` set (or cleared)."""
    return Call("set_vip", (vip_id, *VIPS[vip_id]), kwargs={"udp_lookup_first": on})


def _lookup_first_cases() -> list[GoldenCase]:
    u4, u6 = flow4(50000, 53, IPPROTO_UDP), flow6(50000, 53, IPPROTO_UDP)
    f4 = flow4()
    other = 3 if pick(u4) != 3 else 1  # a backend Maglev would not pick
    return [
        case(
            "UDP lookup-first v4: datagram of an unknown flow is a MISS (no pick, no NEW)",
            miss_step(udp4(), u4),
            _lookup_first(1),
            after=[lookup(u4, None)],
            flows=0,
        ),
        case(
            "UDP lookup-first v6: datagram of an unknown flow is a MISS",
            miss_step(udp6(), u6),
            _lookup_first(3),
            flows=0,
        ),
        case(
            "UDP lookup-first: CSUMNOTREADY miss carries the completed checksum",
            Process(
                (frame(udp4(partial=True)),),
                (Verdict.MISS,),
                statuses=(CSUM,),
                misses=((1, u4, frame(udp4()), MISS_PACKET),),
            ),
            _lookup_first(1),
        ),
        case(
            "UDP lookup-first: once installed (store answer), FORWARD to the installed backend",
            fwd_step(udp4(), u4, T0 + 5, backend=other),
            _lookup_first(1),
            Call("install", (u4, other, T0)),
            after=[lookup(u4, (other, 1, T0 + 5 + UDP_IDLE))],
            flows=1,
        ),
        case(
            "UDP lookup-first set on a VIP with live flows: they stay and are FORWARD",
            fwd_step(udp4(), u4, T0 + 5),
            syn_step(udp4(), u4),
            _lookup_first(1),
            flows=1,
        ),
        case(
            "UDP lookup-first cleared again: a datagram of an unknown flow is NEW",
            syn_step(udp4(), u4),
            _lookup_first(1),
            _lookup_first(1, on=False),
        ),
        case(
            "UDP lookup-first forgotten by remove_vip: the VIP set again starts flows (NEW)",
            syn_step(udp4(), u4),
            _lookup_first(1),
            Call("remove_vip", (1,), 0),
            Call("set_vip", (1, *VIPS[1])),
            Call("set_maglev", (1, table_bytes(TABLES[1]))),
        ),
        case(
            "UDP lookup-first on a TCP VIP: no effect, SYN is NEW",
            syn_step(tcp4(flags=S), f4),
            _lookup_first(0),
        ),
        case(
            "UDP lookup-first: other VIPs keep starting UDP flows (NEW)",
            syn_step(udp6(), u6),
            _lookup_first(1),
        ),
    ]


def _forward_to_cases() -> list[GoldenCase]:
    big_ack = tcp4(flags=A, payload=b"B" * (TUNNEL_MTU - 40 - 40 + 1))
    big_quote = ipv4(
        VIP4,
        CLIENT4,
        tcp(VIP4, CLIENT4, 80, 40000, flags=A, payload=bytes(1420)),
        proto=IPPROTO_TCP,
    )
    f4, f6, u4 = flow4(), flow6(), flow4(50000, 53, IPPROTO_UDP)
    icmp4, icmp6 = _icmp4(_quote4()), _icmp6(_quote6())
    b4 = pick(f4)
    other = 1 if b4 != 1 else 2
    return [
        case(
            "forward_to: ICMP error about an unknown flow to the given backend, table untouched",
            Process((frame(icmp4),), (Verdict.FORWARD,), tx=(encap(2, icmp4, f4),), forward_to=2),
            after=[lookup(f4, None)],
            flows=0,
        ),
        case(
            "forward_to: ICMPv6 packet-too-big, quoted flow's label",
            Process((frame(icmp6),), (Verdict.FORWARD,), tx=(encap(3, icmp6, f6),), forward_to=3),
            flows=0,
        ),
        case(
            "forward_to: a pinned flow's packets go to the given backend, entry not refreshed",
            Process(
                (frame(tcp4(flags=A | F)), frame(icmp4)),
                (Verdict.FORWARD, Verdict.FORWARD),
                T0 + 500,
                tx=(encap(other, tcp4(flags=A | F), f4), encap(other, icmp4, f4)),
                forward_to=other,
            ),
            syn_step(tcp4(flags=S), f4),
            after=[lookup(f4, (b4, 1, T0 + TCP_IDLE))],
            flows=1,
        ),
        case(
            "forward_to: a UDP datagram of a lookup-first VIP, no flow created",
            Process((frame(udp4()),), (Verdict.FORWARD,), tx=(encap(1, udp4(), u4),), forward_to=1),
            _lookup_first(1),
            after=[lookup(u4, None)],
            flows=0,
        ),
        case(
            "forward_to -1 (no Maglev backend): DROP_NO_BACKEND",
            Process((frame(icmp4),), (Verdict.DROP_NO_BACKEND,), forward_to=-1),
        ),
        case(
            "forward_to a backend_id with no set_backend: DROP_NO_BACKEND",
            Process((frame(icmp4),), (Verdict.DROP_NO_BACKEND,), forward_to=9),
        ),
        case(
            "forward_to: frames not ours keep process's verdicts",
            Process(
                (
                    frame(tcp4(dst=OTHER4)),
                    frame(_icmp4(_quote4(src=OTHER4))),
                    frame(_icmp4(_quote4(), type_=11, code=0)),
                    eth(ETH_P_ARP, dst=b"\xff" * 6) + bytes(28),
                ),
                (
                    Verdict.PASS_NOT_VIP,
                    Verdict.DROP_ICMP_BAD_QUOTE,
                    Verdict.PASS_NOT_SERVICE,
                    Verdict.PASS_NOT_IP,
                ),
                forward_to=2,
            ),
        ),
        case(
            "forward_to: a too-big TCP packet gets the too-big answer as in process (REPLY)",
            Process(
                (frame(big_ack),),
                (Verdict.REPLY_TOO_BIG,),
                tx=((REPLY, _too_big_reply4(big_ack)),),
                forward_to=2,
            ),
        ),
        case(
            "forward_to: an ICMP error too big for the tunnel: DROP_TOO_BIG",
            Process(
                (frame(_icmp4(big_quote)),),
                (Verdict.DROP_TOO_BIG,),
                forward_to=2,
            ),
        ),
    ]


def _all_cases() -> list[GoldenCase]:
    cases = (
        _flow_starts()
        + _lifecycle()
        + _icmp_cases()
        + _drop_cases()
        + _too_big_cases()
        + _checksum_cases()
        + _table_cases()
        + _lookup_first_cases()
        + _forward_to_cases()
    )
    names = [c.description for c in cases]
    assert len(names) == len(set(names)), "golden case descriptions must be unique"
    return cases


CASES: list[GoldenCase] = _all_cases()
