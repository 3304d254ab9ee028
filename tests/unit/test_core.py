"""The slow path (ForwardingCore) driven by a real engine and the in-process store, no I/O.

Two cores sharing one store stand for two POPs: a flow pinned by one is found by the other.
"""

from __future__ import annotations

import ipaddress
from array import array
from typing import Any, cast

import pytest

from flowstate.errors import StoreUnavailable
from flowstate.flow import FiveTuple, Proto
from flowstate.record import FlowRecord
from flowstate.store import MemoryStore
from forwarder import packet as P
from forwarder.core import CoreConfig, ForwardingCore, StoreWork, to_tuple, to_tuples
from forwarder.fastpath import c_engine_available, load_engine
from forwarder.maglev import MaglevTable

SRC6 = ipaddress.IPv6Address("2001:db8:f0::1").packed
VIP = ipaddress.IPv4Address("192.0.2.10").packed
CLIENT = ipaddress.IPv4Address("198.51.100.7").packed
BACKENDS = [ipaddress.IPv6Address(f"2001:db8:b::{i}").packed for i in range(1, 5)]
IDS = {ip: i for i, ip in enumerate(BACKENDS)}
NOW = 1_000_000

IMPLS = ["python"] + (["c"] if c_engine_available() else [])


def _table(backends: list[bytes]) -> bytes:
    t = MaglevTable.build([(b, 1) for b in backends], 13)
    return array("H", (IDS[t.backends[i][0]] for i in t.table)).tobytes()


def make_pop(
    impl: str, name: str, backends: list[bytes], allowed: list[bytes] | None = None, **cfg: Any
) -> ForwardingCore:
    """A POP whose Maglev uses `backends`; stored records may name `allowed` (default: same)."""
    engine = load_engine(impl)(
        source_ipv6=SRC6,
        capacity=1024,
        tcp_idle_ms=60_000,
        udp_idle_ms=10_000,
        fin_linger_ms=1_000,
        touch_interval_ms=15_000,
    )
    for ip, bid in IDS.items():
        engine.set_backend(bid, ip)
    engine.set_vip(0, VIP, 80, 6)
    engine.set_maglev(0, _table(backends))
    core = ForwardingCore(engine, CoreConfig(pop=name, **cfg))
    core.set_backend_ids(IDS)
    core.set_vip(0, VIP, 80, 6, [IDS[b] for b in (allowed or backends)])
    return core


def tcp_frame(port: int, flags: int) -> bytes:
    return P.frame(P.ipv4(CLIENT, VIP, P.tcp(CLIENT, VIP, port, 80, flags=flags), proto=6))


def flow(port: int) -> tuple[int, bytes, int, bytes, int]:
    return (6, CLIENT, port, VIP, 80)


async def run_store(core: ForwardingCore, store: Any, now: int, *, down: bool = False) -> list[Any]:
    """Perform one round of store work as the service would; return the tx of re-run frames."""
    work: StoreWork = core.take_store_work(now, wall_ms=1_700_000_000_000)
    tx: list[Any] = []
    if work.lookups:
        records = None if down else await store.lookup_many([to_tuple(f) for f in work.lookups])
        result = core.on_lookups(work.lookups, records, now)
        if result is not None:
            tx.extend(result.tx)
    if work.pins:
        stored = (
            None if down else await store.pin_many([(to_tuple(f), r, t) for f, r, t in work.pins])
        )
        core.on_pins(work, stored, now)
    return tx


def feed(core: ForwardingCore, frames: list[bytes], now: int = NOW) -> Any:
    result = core.engine.process(frames, now)
    core.on_result(result, now)
    return result


@pytest.fixture(params=IMPLS)
def impl(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_syn_is_pinned_and_found_by_another_pop(impl: str) -> None:
    store = MemoryStore()
    pop1 = make_pop(impl, "pop1", BACKENDS[:3])
    r = feed(pop1, [tcp_frame(40000, P.TCP_SYN)])
    assert r.verdicts == bytes([P.Verdict.NEW])
    chosen = r.tx[0][0]
    await run_store(pop1, store, NOW)
    (rec,) = await store.lookup_many([to_tuple(flow(40000))])
    assert rec is not None and rec.backend_ip == BACKENDS[chosen] and rec.pop == "pop1"

    # POP2 has a different backend set (one added): Maglev alone could disagree, the store not.
    pop2 = make_pop(impl, "pop2", BACKENDS)
    r2 = feed(pop2, [tcp_frame(40000, P.TCP_ACK), tcp_frame(40000, P.TCP_ACK | P.TCP_PSH)])
    assert r2.verdicts == bytes([P.Verdict.MISS, P.Verdict.MISS]) and not r2.tx
    tx = await run_store(pop2, store, NOW + 1)
    assert [bid for bid, _ in tx] == [chosen, chosen]
    assert pop2.counters["lookup_hits"] == 1 and pop2.queued_frames == 0
    # Now the flow is local at POP2: no further store round trip.
    r3 = feed(pop2, [tcp_frame(40000, P.TCP_ACK)], NOW + 2)
    assert r3.verdicts == bytes([P.Verdict.FORWARD]) and r3.tx[0][0] == chosen


async def test_store_down_falls_back_to_maglev_and_writes_back(impl: str) -> None:
    store = MemoryStore()
    pop = make_pop(impl, "pop1", BACKENDS[:3], lookup_patience_ms=50)
    feed(pop, [tcp_frame(40001, P.TCP_ACK)])
    # Within its patience the packet stays queued and the lookup is asked again...
    assert await run_store(pop, store, NOW + 10, down=True) == []
    assert pop.counters["lookup_retries"] == 1 and pop.queued_frames == 1
    # ...past it, Maglev decides.
    tx = await run_store(pop, store, NOW + 60, down=True)
    expected = pop.engine.maglev_pick(0, to_tuple(flow(40001)).hash64())
    assert [bid for bid, _ in tx] == [expected]
    assert pop.counters["lookup_failed"] == 2 and pop.counters["fallbacks"] == 1
    # The store is back: the fallback choice is written so other POPs agree.
    await run_store(pop, store, NOW + 1000)
    (rec,) = await store.lookup_many([to_tuple(flow(40001))])
    assert rec is not None and rec.backend_ip == BACKENDS[expected]


async def test_record_with_foreign_backend_is_rejected(impl: str) -> None:
    store = MemoryStore()
    evil = ipaddress.IPv6Address("2001:db8:666::1").packed
    await store.pin_many([(to_tuple(flow(40002)), FlowRecord(evil, VIP, 1, "x"), 60_000)])
    pop = make_pop(impl, "pop1", BACKENDS[:3])
    feed(pop, [tcp_frame(40002, P.TCP_ACK)])
    tx = await run_store(pop, store, NOW)
    assert pop.counters["record_rejected"] == 1
    assert [bid for bid, _ in tx] == [pop.engine.maglev_pick(0, to_tuple(flow(40002)).hash64())]
    # A backend of another VIP (known to the engine but not allowed here) is rejected as well.
    await store.delete([to_tuple(flow(40003))])
    await store.pin_many([(to_tuple(flow(40003)), FlowRecord(BACKENDS[3], VIP, 1, "x"), 60_000)])
    feed(pop, [tcp_frame(40003, P.TCP_ACK)])
    tx = await run_store(pop, store, NOW)
    assert pop.counters["record_rejected"] == 2 and tx[0][0] != 3


async def test_nx_conflict_adopts_the_first_pin(impl: str) -> None:
    store = MemoryStore()
    # Find a flow whose Maglev choice differs between the two backend sets.
    pop1 = make_pop(impl, "pop1", BACKENDS[:2])
    # POP2 knows every backend but its Maglev uses only two (the others drain there).
    pop2 = make_pop(impl, "pop2", BACKENDS[2:], allowed=BACKENDS)
    port = 41000
    r1 = feed(pop1, [tcp_frame(port, P.TCP_SYN)])
    await run_store(pop1, store, NOW)
    r2 = feed(pop2, [tcp_frame(port, P.TCP_SYN)])
    assert r1.tx[0][0] != r2.tx[0][0]
    await run_store(pop2, store, NOW)
    assert pop2.counters["pins_adopted"] == 1
    entry = pop2.engine.lookup(flow(port))
    assert entry is not None and entry[0] == r1.tx[0][0]


async def test_miss_queue_is_bounded(impl: str) -> None:
    pop = make_pop(impl, "pop1", BACKENDS[:3], miss_queue_per_flow=2, miss_queue_total=3)
    feed(pop, [tcp_frame(42000, P.TCP_ACK)] * 5 + [tcp_frame(42001, P.TCP_ACK)] * 2)
    assert pop.queued_frames == 3
    assert pop.counters["miss_queue_full"] == 4
    tx = await run_store(pop, MemoryStore(), NOW)
    assert len(tx) == 3 and pop.queued_frames == 0


async def test_store_writes_are_capped(impl: str) -> None:
    pop = make_pop(impl, "pop1", BACKENDS[:3], max_writes_per_s=10)
    feed(pop, [tcp_frame(43000 + i, P.TCP_SYN) for i in range(100)])
    store = MemoryStore()
    work = pop.take_store_work(NOW)
    assert len(work.pins) == 10
    work2 = pop.take_store_work(NOW + 500)  # half a second refills five tokens
    assert len(work2.pins) == 5
    assert len(store) == 0


async def test_fin_releases_and_touch_refreshes(impl: str) -> None:
    pop = make_pop(impl, "pop1", BACKENDS[:3])
    feed(pop, [tcp_frame(44000, P.TCP_SYN)])
    feed(pop, [tcp_frame(44000, P.TCP_ACK)], NOW + 20_000)  # past touch_interval
    feed(pop, [tcp_frame(44000, P.TCP_FIN | P.TCP_ACK)], NOW + 20_001)
    work = pop.take_store_work(NOW + 20_002)
    assert [f for f, _r, _t in work.pins] == [flow(44000)]
    assert work.releases == [flow(44000)]
    assert work.touches == [] or work.touches == [flow(44000)]
    assert FiveTuple.make(Proto.TCP, CLIENT, 44000, VIP, 80) == to_tuple(flow(44000))


async def test_without_fallback_packets_of_unknown_flows_drop(impl: str) -> None:
    pop = make_pop(impl, "pop1", BACKENDS[:3], lookup_patience_ms=0, fallback=False)
    feed(pop, [tcp_frame(45000, P.TCP_ACK)] * 3)
    assert await run_store(pop, MemoryStore(), NOW, down=True) == []
    assert pop.counters["dropped_no_store"] == 3 and pop.queued_frames == 0
    assert pop.engine.lookup(flow(45000)) is None


async def test_record_of_a_dead_backend_is_repinned_over(impl: str) -> None:
    """A backend down past the re-pin grace: the record naming it is not followed, Maglev
    (which no longer has it) decides, and the new pinning replaces the dead one in the store."""
    store = MemoryStore()
    port = next(p for p in range(46000, 47000) if _table_pick(BACKENDS[:3], p) == 2)
    await store.pin_many([(to_tuple(flow(port)), FlowRecord(BACKENDS[2], VIP, 1, "x"), 60_000)])
    # Down, within the grace: the record is still followed (its connection keeps working).
    pop = make_pop(impl, "pop1", BACKENDS[:2], allowed=BACKENDS[:3])
    feed(pop, [tcp_frame(port, P.TCP_ACK)])
    assert [bid for bid, _ in await run_store(pop, store, NOW)] == [2]
    # Dead: BACKENDS[2] is configured but not usable any more.
    dead = make_pop(impl, "pop2", BACKENDS[:2], allowed=BACKENDS[:3])
    dead.set_vip(0, VIP, 80, 6, [0, 1, 2], usable=[0, 1])
    feed(dead, [tcp_frame(port, P.TCP_ACK)])
    work = dead.take_store_work(NOW)
    result = dead.on_lookups(work.lookups, await store.lookup_many([to_tuple(flow(port))]), NOW)
    moved = result.tx[0][0]
    assert moved in (0, 1) and dead.counters["record_backend_down"] == 1
    assert dead.counters["record_rejected"] == 0  # not foreign: known, and dead
    work = dead.take_store_work(NOW + 1)
    assert work.overwrites == {flow(port)} and work.writebacks == {flow(port)}
    await store.delete([to_tuple(f) for f in work.overwrites])  # as the driver does
    dead.on_pins(work, await store.pin_many([(to_tuple(f), r, t) for f, r, t in work.pins]), NOW)
    (rec,) = await store.lookup_many([to_tuple(flow(port))])
    assert rec is not None and rec.backend_ip == BACKENDS[moved] and rec.pop == "pop2"


async def test_failed_overwrite_is_retried_as_an_overwrite(impl: str) -> None:
    store = MemoryStore()
    await store.pin_many([(to_tuple(flow(47000)), FlowRecord(BACKENDS[2], VIP, 1, "x"), 60_000)])
    pop = make_pop(impl, "pop1", BACKENDS[:2], allowed=BACKENDS[:3])
    pop.set_vip(0, VIP, 80, 6, [0, 1, 2], usable=[0, 1])
    feed(pop, [tcp_frame(47000, P.TCP_ACK)])
    await run_store(pop, store, NOW)
    work = pop.take_store_work(NOW + 1)
    pop.on_pins(work, None, NOW + 1)  # the store failed
    again = pop.take_store_work(NOW + 1000)
    assert again.overwrites == {flow(47000)}


def _table_pick(backends: list[bytes], port: int) -> int:
    """backend_id Maglev over `backends` gives flow(port)."""
    entries = array("H")
    entries.frombytes(_table(backends))
    return entries[to_tuple(flow(port)).hash64() % len(entries)]


async def test_pin_conflict_with_a_dead_backend_overwrites(impl: str) -> None:
    """UDP: the first datagram of a flow unknown here is a new flow (Maglev, then SET NX). If
    the store names a dead backend, the new choice is kept and written over it."""
    store = MemoryStore()
    udp = (17, CLIENT, 48000, VIP, 53)
    await store.pin_many([(to_tuple(udp), FlowRecord(BACKENDS[2], VIP, 1, "x"), 60_000)])
    pop = make_pop(impl, "pop1", BACKENDS[:2], allowed=BACKENDS[:3])
    pop.engine.set_vip(1, VIP, 53, 17)
    pop.engine.set_maglev(1, _table(BACKENDS[:2]))
    pop.set_vip(1, VIP, 53, 17, [0, 1, 2], usable=[0, 1])
    frame = P.frame(P.ipv4(CLIENT, VIP, P.udp(CLIENT, VIP, 48000, 53, b"q"), proto=17))
    r = feed(pop, [frame])
    assert r.verdicts == bytes([P.Verdict.NEW])
    ours = r.tx[0][0]
    await run_store(pop, store, NOW)  # NX finds the dead backend's record
    assert pop.counters["record_backend_down"] == 1 and pop.counters["pins_adopted"] == 0
    work = pop.take_store_work(NOW + 1)
    assert work.overwrites == {udp}
    await store.delete([to_tuple(f) for f in work.overwrites])
    pop.on_pins(work, await store.pin_many([(to_tuple(f), r, t) for f, r, t in work.pins]), NOW)
    (rec,) = await store.lookup_many([to_tuple(udp)])
    assert rec is not None and rec.backend_ip == BACKENDS[ours]


@pytest.mark.parametrize("dead", [False, True])
async def test_syn_reusing_ports_of_a_connection_on_a_backend_out_of_maglev_overwrites(
    impl: str, dead: bool
) -> None:
    """Port reuse (issue 7): a connection pinned to b2 died (b2 killed, or drained) and left
    its entry and record behind; the client's next SYN on the same ports goes to Maglev's
    pick (the engine re-creates the flow), and the NX pin meeting b2's record keeps ours and
    writes it over the record, whether b2 is down within the re-pin grace (still `usable`),
    drained (likewise) or dead (not `usable`)."""
    store = MemoryStore()
    port = 47100
    await store.pin_many([(to_tuple(flow(port)), FlowRecord(BACKENDS[2], VIP, 1, "x"), 60_000)])
    pop = make_pop(impl, "pop1", BACKENDS[:2], allowed=BACKENDS[:3])
    pop.set_vip(0, VIP, 80, 6, [0, 1, 2], usable=[0, 1] if dead else [0, 1, 2], selectable=[0, 1])
    pop.engine.install(flow(port), 2, NOW - 1000)  # the old connection, ESTABLISHED
    r = feed(pop, [tcp_frame(port, P.TCP_SYN)])
    assert r.verdicts == bytes([P.Verdict.NEW])
    ours = r.tx[0][0]
    assert ours in (0, 1)
    await run_store(pop, store, NOW)  # NX finds b2's record
    assert pop.counters["pins_adopted"] == 0
    entry = pop.engine.lookup(flow(port))
    assert entry is not None and entry[0] == ours
    work = pop.take_store_work(NOW + 1000)
    assert work.overwrites == {flow(port)}
    await store.delete([to_tuple(f) for f in work.overwrites])
    pop.on_pins(work, await store.pin_many([(to_tuple(f), r, t) for f, r, t in work.pins]), NOW)
    (rec,) = await store.lookup_many([to_tuple(flow(port))])
    assert rec is not None and rec.backend_ip == BACKENDS[ours]
    # The handshake's ACK and a retransmitted SYN stay with ours.
    r2 = feed(pop, [tcp_frame(port, P.TCP_ACK), tcp_frame(port, P.TCP_SYN)], NOW + 1001)
    assert [b for b, _ in r2.tx] == [ours, ours]


async def test_failed_pin_batch_is_retried_with_backoff_while_new_pins_go_on(impl: str) -> None:
    """A failed write batch holds back only its own pins (written back after a wait that
    doubles with each failure in a row); pins of new flows are written meanwhile (until the
    third failure in a row), and no pin of the failed batches is lost."""
    store = MemoryStore()
    pop = make_pop(impl, "pop1", BACKENDS[:3], write_retry_min_ms=10, write_retry_ms=35)
    feed(pop, [tcp_frame(port, P.TCP_SYN) for port in range(41000, 41004)])
    first = pop.take_store_work(NOW)
    assert {f for f, _r, _t in first.pins} == {flow(p) for p in range(41000, 41004)}
    pop.on_pins(first, None, NOW)  # the store failed this batch
    assert pop.counters["pin_failed"] == 4

    # New flows are pinned at once; the failed batch waits its 10 ms.
    feed(pop, [tcp_frame(41010, P.TCP_SYN)], NOW + 1)
    work = pop.take_store_work(NOW + 1)
    assert [f for f, _r, _t in work.pins] == [flow(41010)] and not work.writebacks
    pop.on_pins(work, None, NOW + 1)  # fails too: the next wait is 20 ms
    assert not pop.has_work(NOW + 5) and not pop.take_store_work(NOW + 5).pins
    # At NOW + 10 the first failure's wait is over, but the second one's (20 ms) is not.
    assert not pop.take_store_work(NOW + 20).pins
    retry = pop.take_store_work(NOW + 21)
    assert retry.writebacks == {flow(p) for p in (41000, 41001, 41002, 41003, 41010)}
    pop.on_pins(retry, None, NOW + 21)  # third failure in a row: 40 ms, capped at 35
    # From the third failure in a row the store is taken to be failing: new pins wait too.
    feed(pop, [tcp_frame(41011, P.TCP_SYN)], NOW + 30)
    assert not pop.has_work(NOW + 30) and pop.writes_due_in(NOW + 30) == 26
    assert not pop.take_store_work(NOW + 55).pins
    retry = pop.take_store_work(NOW + 56)
    assert len(retry.pins) == 6 and len(retry.writebacks) == 5
    pop.on_pins(retry, await store.pin_many([(to_tuple(f), r, t) for f, r, t in retry.pins]), NOW)
    for port in (41000, 41001, 41002, 41003, 41010, 41011):
        (rec,) = await store.lookup_many([to_tuple(flow(port))])
        entry = pop.engine.lookup(flow(port))
        assert rec is not None and entry is not None and rec.backend_ip == BACKENDS[entry[0]]
    # The success ended the series: the next failure waits the first 10 ms again.
    feed(pop, [tcp_frame(41020, P.TCP_SYN)], NOW + 60)
    work = pop.take_store_work(NOW + 60)
    pop.on_pins(work, None, NOW + 60)
    assert not pop.take_store_work(NOW + 69).pins
    assert pop.take_store_work(NOW + 70).writebacks == {flow(41020)}


async def test_pins_of_a_round_share_one_record_per_backend(impl: str) -> None:
    """The records of a round are one object per (backend, VIP), so that the store encodes
    each once; every pin still names its flow's backend."""
    store = MemoryStore()
    pop = make_pop(impl, "pop1", BACKENDS[:3])
    feed(pop, [tcp_frame(port, P.TCP_SYN) for port in range(42000, 42064)])
    work = pop.take_store_work(NOW, wall_ms=1_700_000_000_000)
    assert len(work.pins) == 64
    records = {id(r) for _f, r, _t in work.pins}
    backends = {r.backend_ip for _f, r, _t in work.pins}
    assert len(records) == len(backends) > 1
    for f, r, _t in work.pins:
        entry = pop.engine.lookup(f)
        assert entry is not None and r.backend_ip == BACKENDS[entry[0]]
        assert r == FlowRecord(BACKENDS[entry[0]], VIP, 1_700_000_000_000, "pop1")
    pop.on_pins(work, await store.pin_many([(to_tuple(f), r, t) for f, r, t in work.pins]), NOW)
    assert pop.counters["pins_adopted"] == 0


def test_to_tuple_equals_the_reference() -> None:
    for f in [flow(1), (17, CLIENT, 65535, VIP, 53), (6, BACKENDS[0], 0, BACKENDS[1], 443)]:
        t = to_tuple(f)
        assert t == FiveTuple(Proto(f[0]), f[1], f[2], f[3], f[4])
        assert type(t.proto) is Proto and t.key() == FiveTuple.make(*f).key()
    with pytest.raises(ValueError):
        to_tuple((99, CLIENT, 0, VIP, 0))


def test_to_tuples_equals_to_tuple_of_each() -> None:
    flows = [flow(1), (17, CLIENT, 65535, VIP, 53), (6, BACKENDS[0], 0, BACKENDS[1], 443)]
    got = to_tuples(flows)
    assert got == [to_tuple(f) for f in flows] and to_tuples([]) == []
    assert [type(t.proto) for t in got] == [Proto, Proto, Proto]
    assert [t.key() for t in got] == [FiveTuple.make(*f).key() for f in flows]
    with pytest.raises(ValueError):
        to_tuples([flow(1), (99, CLIENT, 0, VIP, 0)])


async def test_one_failed_master_fails_only_its_flows(impl: str) -> None:
    """Issue 7: a lookup batch whose items of one (down) master are LOOKUP_FAILED installs
    the other flows from the store; the failed ones alone wait (patience), are asked again,
    then fall back to Maglev and are written back."""
    from flowstate.store.base import LOOKUP_FAILED

    store = MemoryStore()
    pop = make_pop(impl, "pop1", BACKENDS[:3], lookup_patience_ms=50)
    # Pinned elsewhere on a backend this POP's Maglev would not pick (a route move).
    ports = [p for p in range(49000, 49100) if _table_pick(BACKENDS[:3], p) != 2][:4]
    pinned = FlowRecord(BACKENDS[2], VIP, 1, "pop0")
    await store.pin_many([(to_tuple(flow(p)), pinned, 60_000) for p in ports])
    down = set(ports[2:])  # their "master" is down
    store.unreachable = lambda t: t.client_port in down
    feed(pop, [tcp_frame(p, P.TCP_ACK) for p in ports])

    work = pop.take_store_work(NOW + 10)
    assert sorted(work.lookups) == sorted(flow(p) for p in ports)
    records = await store.lookup_many([to_tuple(f) for f in work.lookups], partial=True)
    assert [r is LOOKUP_FAILED for r in records] == [f[2] in down for f in work.lookups]
    result = pop.on_lookups(work.lookups, records, NOW + 10)
    # The answered flows go to the stored backend (not Maglev's choice), at once.
    assert sorted(bid for bid, _ in result.tx) == [2, 2]
    for p in ports:
        entry = pop.engine.lookup(flow(p))
        assert (entry is None) == (p in down)
        assert entry is None or entry[0] == 2
    assert pop.counters["lookup_hits"] == 2 and pop.counters["lookup_failed"] == 2
    assert pop.counters["lookup_retries"] == 2 and pop.counters["fallbacks"] == 0
    assert pop.queued_frames == 2  # the failed flows' packets wait within their patience

    # Asked again (only they), still failing, past their patience: Maglev decides for them.
    work = pop.take_store_work(NOW + 70)
    assert sorted(work.lookups) == sorted(flow(p) for p in down)
    with pytest.raises(StoreUnavailable):  # nothing of this batch could be answered
        await store.lookup_many([to_tuple(f) for f in work.lookups], partial=True)
    result = pop.on_lookups(work.lookups, None, NOW + 70)
    picks = {p: pop.engine.maglev_pick(0, to_tuple(flow(p)).hash64()) for p in down}
    assert sorted(bid for bid, _ in result.tx) == sorted(picks.values())
    assert pop.counters["fallbacks"] == 2 and pop.queued_frames == 0
    # Their choice is written back (NX: the store keeps what it had, the POPs then agree
    # flow by flow); the answered flows are not written at all.
    work = pop.take_store_work(NOW + 80)
    assert work.writebacks == {flow(p) for p in down}


async def test_partial_lookup_contract_of_the_memory_store() -> None:
    from flowstate.store.base import LOOKUP_FAILED

    store = MemoryStore()
    ts = [to_tuple(flow(p)) for p in range(50000, 50004)]
    rec = FlowRecord(BACKENDS[0], VIP, 1, "pop0")
    await store.pin_many([(ts[0], rec, 60_000), (ts[2], rec, 60_000)])
    store.unreachable = lambda t: t.client_port >= 50002
    assert await store.lookup_many(ts, partial=True) == [rec, None, LOOKUP_FAILED, LOOKUP_FAILED]
    with pytest.raises(StoreUnavailable):  # without `partial` any failed item fails the call
        await store.lookup_many(ts)
    with pytest.raises(StoreUnavailable):  # with it, only a call with nothing answered
        await store.lookup_many(ts[2:], partial=True)
    assert await store.lookup_many(ts[:2]) == [rec, None]
    assert await store.lookup_many([], partial=True) == []


async def test_writes_linger_to_fill_a_batch_and_lookups_never_wait(impl: str) -> None:
    """With `write_linger_ms`, pins wait for a full batch or the linger, whichever comes first;
    a lookup round takes them along at once, and lookups themselves never wait."""
    store = MemoryStore()
    pop = make_pop(impl, "pop1", BACKENDS[:3], write_linger_ms=5, max_batch=4)
    feed(pop, [tcp_frame(43000, P.TCP_SYN)])
    assert not pop.has_work(NOW) and pop.writes_due_in(NOW) == 5
    assert not pop.take_store_work(NOW + 4).pins and pop.writes_due_in(NOW + 4) == 1
    work = pop.take_store_work(NOW + 5)
    assert [f for f, _r, _t in work.pins] == [flow(43000)]
    pop.on_pins(work, await store.pin_many([(to_tuple(f), r, t) for f, r, t in work.pins]), NOW)
    assert pop.writes_due_in(NOW + 5) is None and not pop.has_work(NOW + 100)

    # A full batch goes at once.
    feed(pop, [tcp_frame(port, P.TCP_SYN) for port in range(43001, 43005)], NOW + 10)
    assert pop.has_work(NOW + 10) and len(pop.take_store_work(NOW + 10).pins) == 4

    # A lookup is not held back, and the waiting pin goes with it.
    feed(pop, [tcp_frame(43010, P.TCP_SYN)], NOW + 20)
    assert not pop.has_work(NOW + 20)
    feed(pop, [tcp_frame(43011, P.TCP_ACK)], NOW + 21)
    assert pop.has_work(NOW + 21)
    work = pop.take_store_work(NOW + 21)
    assert work.lookups == [flow(43011)] and [f for f, _r, _t in work.pins] == [flow(43010)]

    # At stop, what lingers is written at once, without lookups.
    feed(pop, [tcp_frame(43020, P.TCP_SYN)], NOW + 30)
    assert not pop.take_store_work(NOW + 30).pins
    feed(pop, [tcp_frame(43021, P.TCP_ACK)], NOW + 30)
    work = pop.take_store_work(NOW + 30, flush=True)
    assert not work.lookups and [f for f, _r, _t in work.pins] == [flow(43020)]


def _new_events(flows: list[tuple[int, bytes, int, bytes, int]], bids: list[int]) -> Any:
    """A processed batch holding only NEW events (what a burst of SYNs gives)."""

    class Result:
        misses: list[Any] = []
        events = [(1, f, b) for f, b in zip(flows, bids, strict=True)]

    return Result()


def test_new_pins_are_taken_oldest_first_within_batch_and_tokens() -> None:
    """Pins leave in event order, at most `max_batch` per round and one write token each; a pin
    naming a backend no longer known is dropped without using either."""
    core = ForwardingCore(cast(Any, None), CoreConfig(pop="p", max_batch=5, max_writes_per_s=7))
    core.set_backend_ids(IDS)
    flows = [flow(1000 + i) for i in range(12)]
    bids = [0, 99, 1, 2, 99, 3, 0, 1, 2, 3, 0, 1]  # 99: unknown backend
    core.on_result(_new_events(flows, bids), NOW)
    work = core.take_store_work(NOW, NOW)
    assert [f for f, _, _ in work.pins] == [flows[i] for i in (0, 2, 3, 5, 6)]
    assert [r.backend_ip for _, r, _ in work.pins] == [BACKENDS[b] for b in (0, 1, 2, 3, 0)]
    assert work.pins[0][1] is work.pins[4][1]  # one record per (backend, VIP) in a round
    work = core.take_store_work(NOW, NOW)  # 2 tokens left of 7
    assert [f for f, _, _ in work.pins] == [flows[7], flows[8]]
    work = core.take_store_work(NOW + 1000, NOW)  # refilled
    assert [f for f, _, _ in work.pins] == flows[9:]
    assert core.counters["pins"] == 10


def test_pins_past_the_cap_drop_the_oldest() -> None:
    core = ForwardingCore(cast(Any, None), CoreConfig(pop="p", max_writes_per_s=2))
    core.set_backend_ids(IDS)
    flows = [flow(1000 + i) for i in range(11)]
    core.on_result(_new_events(flows, [0] * 11), NOW)
    assert core.counters["writes_rate_limited"] == 3  # the cap is 4 x 2 queued pins
    assert [f for f, _, _ in core.take_store_work(NOW, NOW).pins] == flows[3:5]
