"""The slow path's ICMP errors about unknown flows and UDP lookup-first, with real engines and
the in-process store (forwarder/DATAPATH.md "ICMP errors about unknown flows", "UDP lookup-first").

An ICMP error never creates state: not in the flow table, not in the store. A UDP datagram of a
flow unknown to a lookup-first VIP waits for the store, and a flow the store does not know is
pinned like a flow start.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from flowstate.record import FlowRecord
from flowstate.store import MemoryStore
from forwarder import packet as P
from forwarder.core import ForwardingCore, to_tuple
from tests.unit.test_core import BACKENDS, CLIENT, IDS, IMPLS, NOW, VIP, _table, make_pop, run_store

ROUTER = ipaddress.IPv4Address("203.0.113.1").packed
UDP_PORT = 53

FlowT = tuple[int, bytes, int, bytes, int]


@pytest.fixture(params=IMPLS)
def impl(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def pop(
    impl: str, name: str, backends: list[bytes], *, lookup_first: bool = True, **cfg: Any
) -> Any:
    """`make_pop` plus a UDP VIP (vip_id 1) on the same address, lookup-first by default."""
    core: ForwardingCore = make_pop(impl, name, backends, **cfg)
    engine: Any = core.engine
    engine.set_vip(1, VIP, UDP_PORT, 17, udp_lookup_first=lookup_first)
    engine.set_maglev(1, _table(backends))
    core.set_vip(1, VIP, UDP_PORT, 17, [IDS[b] for b in backends])
    return core


def tcp_flow(port: int) -> FlowT:
    return (6, CLIENT, port, VIP, 80)


def udp_flow(port: int) -> FlowT:
    return (17, CLIENT, port, VIP, UDP_PORT)


def icmp_about(flow: FlowT) -> bytes:
    """A router's ICMP frag-needed quoting the VIP → client packet of `flow`."""
    proto, client, cport, vip, vport = flow
    if proto == 6:
        l4 = P.tcp(vip, client, vport, cport, flags=P.TCP_ACK, payload=b"x" * 32)
    else:
        l4 = P.udp(vip, client, vport, cport, b"answer")
    quote = P.ipv4(vip, client, l4, proto=proto)
    return P.frame(P.ipv4(ROUTER, VIP, P.icmp4_error(3, 4, quote, rest=1400), proto=1))


def tcp_frame(port: int, flags: int = P.TCP_ACK) -> bytes:
    return P.frame(P.ipv4(CLIENT, VIP, P.tcp(CLIENT, VIP, port, 80, flags=flags), proto=6))


def udp_frame(port: int) -> bytes:
    return P.frame(P.ipv4(CLIENT, VIP, P.udp(CLIENT, VIP, port, UDP_PORT, b"query"), proto=17))


def feed(core: Any, frames: list[bytes], now: int = NOW) -> Any:
    result = core.engine.process(frames, now)
    core.on_result(result, now)
    return result


def maglev(core: Any, flow: FlowT) -> int:
    vip_id = 0 if flow[0] == 6 else 1
    return int(core.engine.maglev_pick(vip_id, to_tuple(flow).hash64()))


async def stored(store: MemoryStore, flows: list[FlowT]) -> list[Any]:
    return list(await store.lookup_many([to_tuple(f) for f in flows]))


def ports_where_choices_differ(a: Any, b: Any, flow_of: Any, count: int) -> list[int]:
    """Client ports whose flows Maglev sends to different backends at POPs `a` and `b`."""
    out = [p for p in range(41000, 43000) if maglev(a, flow_of(p)) != maglev(b, flow_of(p))]
    assert len(out) >= count
    return out[:count]


# --- ICMP errors ---------------------------------------------------------------------------------


async def test_icmp_error_about_unknown_flow_goes_to_maglev_and_creates_nothing(impl: str) -> None:
    store = MemoryStore()
    core = pop(impl, "pop1", BACKENDS[:3])
    f = tcp_flow(40000)
    r = feed(core, [icmp_about(f)])
    assert r.verdicts == bytes([P.Verdict.MISS])
    assert [m[3] for m in r.misses] == [P.MISS_ICMP]
    tx = await run_store(core, store, NOW + 1)
    assert [bid for bid, _ in tx] == [maglev(core, f)]
    assert tx[0][1][40:] == icmp_about(f)[14:]  # the ICMP error itself, tunnelled
    assert len(core.engine) == 0 and core.engine.lookup(f) is None
    # Nothing is written, now or later.
    assert not core.has_work(NOW + 2000)
    await run_store(core, store, NOW + 2000)
    assert await stored(store, [f]) == [None]
    c = core.counters
    assert (c["icmp_misses"], c["icmp_maglev"], c["fallbacks"], c["pins"]) == (1, 1, 0, 0)
    assert core.engine.counters()["forward_to"] == 1


async def test_icmp_storm_quoting_random_flows_fills_nothing(impl: str) -> None:
    store = MemoryStore()
    core = pop(impl, "pop1", BACKENDS[:3])
    flows = [tcp_flow(20000 + i) for i in range(300)] + [udp_flow(20000 + i) for i in range(300)]
    feed(core, [icmp_about(f) for f in flows])
    tx: list[Any] = []
    while core.has_work(NOW + 1):
        tx += await run_store(core, store, NOW + 1)
    assert len(tx) == len(flows)
    assert len(core.engine) == 0
    assert await stored(store, flows) == [None] * len(flows)
    assert core.counters["icmp_maglev"] == len(flows)
    assert core.counters["pins"] == core.counters["fallbacks"] == 0
    assert core.queued_frames == 0 and not core._icmp_only


async def test_icmp_error_follows_the_stored_pinning_without_installing(impl: str) -> None:
    """After a route move the quoted flow lives at another POP's choice: PMTU must reach it."""
    store = MemoryStore()
    pop1 = pop(impl, "pop1", BACKENDS[:3])
    pop2 = pop(impl, "pop2", BACKENDS)
    (port,) = ports_where_choices_differ(pop1, pop2, tcp_flow, 1)
    f = tcp_flow(port)
    feed(pop1, [tcp_frame(port, P.TCP_SYN)])
    await run_store(pop1, store, NOW)
    chosen = maglev(pop1, f)
    feed(pop2, [icmp_about(f)], NOW + 5)
    tx = await run_store(pop2, store, NOW + 6)
    assert [bid for bid, _ in tx] == [chosen] and chosen != maglev(pop2, f)
    assert len(pop2.engine) == 0
    assert pop2.counters["icmp_stored"] == 1 and pop2.counters["pins"] == 0
    # The data packets that follow look the flow up themselves and install it.
    feed(pop2, [tcp_frame(port)], NOW + 7)
    tx = await run_store(pop2, store, NOW + 8)
    assert [bid for bid, _ in tx] == [chosen] and pop2.engine.lookup(f) is not None


async def test_icmp_error_with_the_store_down(impl: str) -> None:
    store = MemoryStore()
    core = pop(impl, "pop1", BACKENDS[:3], lookup_patience_ms=50)
    f = tcp_flow(40001)
    feed(core, [icmp_about(f)])
    assert await run_store(core, store, NOW + 10, down=True) == []  # within its patience
    tx = await run_store(core, store, NOW + 60, down=True)
    assert [bid for bid, _ in tx] == [maglev(core, f)]
    assert len(core.engine) == 0 and not core.has_work(NOW + 5000)
    await run_store(core, store, NOW + 5000)  # the store is back: no write-back of it
    assert await stored(store, [f]) == [None]
    assert core.counters["fallbacks"] == 0 and core.counters["icmp_maglev"] == 1

    strict = pop(impl, "pop2", BACKENDS[:3], lookup_patience_ms=50, fallback=False)
    feed(strict, [icmp_about(f)])
    assert await run_store(strict, store, NOW + 60, down=True) == []
    assert strict.counters["dropped_no_store"] == 1 and strict.queued_frames == 0
    assert not strict._icmp_only


async def test_icmp_error_about_a_vip_without_backends_is_dropped(impl: str) -> None:
    store = MemoryStore()
    core = pop(impl, "pop1", BACKENDS[:3])
    core.engine.set_maglev(0, b"")
    feed(core, [icmp_about(tcp_flow(40002))])
    assert await run_store(core, store, NOW + 1) == []
    assert core.counters["icmp_no_backend"] == 1 and len(core.engine) == 0


async def test_icmp_error_queued_with_a_data_packet_of_its_flow(impl: str) -> None:
    """A data packet in the same queue makes it an ordinary miss: the flow is installed (as
    before) and the ICMP error follows it through the table."""
    store = MemoryStore()
    core = pop(impl, "pop1", BACKENDS[:3])
    f = tcp_flow(40003)
    feed(core, [icmp_about(f), tcp_frame(40003)])
    tx = await run_store(core, store, NOW + 1)
    assert [bid for bid, _ in tx] == [maglev(core, f)] * 2
    assert core.engine.lookup(f) is not None and core.counters["icmp_maglev"] == 0


async def test_icmp_error_about_a_flow_installed_meanwhile_uses_the_table(impl: str) -> None:
    store = MemoryStore()
    core = pop(impl, "pop1", BACKENDS[:3])
    f = tcp_flow(40004)
    feed(core, [icmp_about(f)])
    core.engine.install(f, 3, NOW)  # e.g. a SYN started it while the lookup ran
    tx = await run_store(core, store, NOW + 1)
    assert [bid for bid, _ in tx] == [3]
    assert core.counters["icmp_maglev"] == core.counters["icmp_stored"] == 0


# --- UDP lookup-first ----------------------------------------------------------------------------


async def test_udp_lookup_first_unknown_flow_is_pinned_like_a_flow_start(impl: str) -> None:
    store = MemoryStore()
    core = pop(impl, "pop1", BACKENDS[:3])
    f = udp_flow(50000)
    r = feed(core, [udp_frame(50000), udp_frame(50000)])
    assert r.verdicts == bytes([P.Verdict.MISS] * 2) and not r.tx and not r.events
    tx = await run_store(core, store, NOW + 1)
    assert [bid for bid, _ in tx] == [maglev(core, f)] * 2
    assert core.engine.lookup(f) is not None
    await run_store(core, store, NOW + 2)
    (rec,) = await stored(store, [f])
    assert rec is not None and rec.backend_ip == BACKENDS[maglev(core, f)] and rec.pop == "pop1"
    c = core.counters
    assert (c["udp_lookup_first_new"], c["fallbacks"], c["lookup_not_found"]) == (1, 0, 1)
    # Known now: the next datagram is a local hit.
    assert feed(core, [udp_frame(50000)], NOW + 3).verdicts == bytes([P.Verdict.FORWARD])


async def test_udp_lookup_first_keeps_a_moved_flow_on_its_backend(impl: str) -> None:
    """Route move + backend change: every datagram of a flow pinned at POP1 reaches its backend
    at POP2, the first one too (without lookup-first the first goes to POP2's Maglev choice)."""
    store = MemoryStore()
    pop1 = pop(impl, "pop1", BACKENDS[:3])
    pop2 = pop(impl, "pop2", BACKENDS)
    old = pop(impl, "pop3", BACKENDS, lookup_first=False)
    ports = ports_where_choices_differ(pop1, pop2, udp_flow, 5)
    feed(pop1, [udp_frame(p) for p in ports])
    await run_store(pop1, store, NOW)
    await run_store(pop1, store, NOW + 1)
    for p in ports:
        f = udp_flow(p)
        r = feed(pop2, [udp_frame(p)], NOW + 10)
        assert r.verdicts == bytes([P.Verdict.MISS])
        tx = await run_store(pop2, store, NOW + 11)
        assert [bid for bid, _ in tx] == [maglev(pop1, f)]
        first = feed(old, [udp_frame(p)], NOW + 10)
        assert first.verdicts == bytes([P.Verdict.NEW])
        assert first.tx[0][0] == maglev(old, f) != maglev(pop1, f)
    assert pop2.counters["lookup_hits"] == 5 and pop2.counters["udp_lookup_first_new"] == 0


async def test_udp_lookup_first_adopts_a_record_pinned_meanwhile(impl: str) -> None:
    """Not found, pinned NX: when another POP pinned the flow in between, its record wins."""
    store = MemoryStore()
    pop1 = pop(impl, "pop1", BACKENDS[:3])
    pop2 = pop(impl, "pop2", BACKENDS)
    (port,) = ports_where_choices_differ(pop1, pop2, udp_flow, 1)
    f = udp_flow(port)
    feed(pop2, [udp_frame(port)])
    work = pop2.take_store_work(NOW + 1, wall_ms=1)
    pop2.on_lookups(work.lookups, [None], NOW + 1)
    assert pop2.engine.lookup(f)[0] == maglev(pop2, f)
    other = FlowRecord(BACKENDS[maglev(pop1, f)], VIP, 1, "pop1")
    await store.pin_many([(to_tuple(f), other, 60_000)])
    await run_store(pop2, store, NOW + 2)
    assert pop2.engine.lookup(f)[0] == maglev(pop1, f)
    assert pop2.counters["pins_adopted"] == 1


async def test_udp_without_lookup_first_starts_at_once(impl: str) -> None:
    core = pop(impl, "pop1", BACKENDS[:3], lookup_first=False)
    r = feed(core, [udp_frame(50001)])
    assert r.verdicts == bytes([P.Verdict.NEW]) and r.events
