"""The per-flow slow path, sans-IO: what the store is asked and what the engine installs.

The data path (`Engine`, C or Python) handles every packet of a known flow itself and reports
misses and flow events. This module turns those into store batches (pins, lookups, touches,
releases), turns the store's answers (or its failure) into engine installs, and re-runs queued
packets once their flow is known. It never does I/O and never reads the clock: the async driver
(`forwarder.service`) passes `now_ms` in and performs the store calls.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from itertools import islice
from operator import is_, itemgetter
from typing import Any, Protocol

from flowstate.flow import FiveTuple, Proto
from flowstate.record import FlowRecord
from flowstate.store.base import LOOKUP_FAILED, LookupResult
from forwarder.packet import IPPROTO_TCP, IPPROTO_UDP, MISS_ICMP

#: A flow as the engine reports it: (proto, client_ip, client_port, vip_ip, vip_port).
FlowT = tuple[int, bytes, int, bytes, int]
#: Per-flow events, one line each at debug (`key=value` fields); never per packet.
flow_log = logging.getLogger("flowstate.flows")

#: Failed write batches in a row after which the store is taken to be failing: then all
#: writes wait out the retry backoff, not only the failed pins (a store that is down is not
#: sent a doomed batch per round).
WRITE_FAILURES_TO_PAUSE = 3
#: Engine event codes (forwarder/DATAPATH.md).
EVENT_NEW, EVENT_CLOSE, EVENT_TOUCH, EVENT_EVICTED = 1, 2, 3, 4


class EngineLike(Protocol):
    """The part of `Engine` the slow path uses."""

    def process(
        self, frames: Sequence[bytes], now_ms: int, statuses: Sequence[int] | None = None
    ) -> Any: ...

    def install(self, flow: FlowT, backend_id: int, now_ms: int) -> None: ...

    def lookup(self, flow: FlowT) -> tuple[int, int, int] | None: ...

    def maglev_pick(self, vip_id: int, hash64: int) -> int: ...

    def forward_to(self, frames: Sequence[bytes], backend_id: int) -> Any: ...


_PROTOS = {int(p): p for p in Proto}
_second = itemgetter(1)
#: FiveTuple's slot descriptors: setting through them skips the frozen dataclass `__init__`
#: (~1 us of the ~2 us `FiveTuple(Proto(...), ...)` costs; one per pinned or looked-up flow).
_FT_SLOTS: dict[str, Any] = dict(vars(FiveTuple))
_ft_proto, _ft_cip, _ft_cport, _ft_vip, _ft_vport = (
    _FT_SLOTS[n].__set__ for n in ("proto", "client_ip", "client_port", "vip_ip", "vip_port")
)
_ft_new = object.__new__


def to_tuple(flow: FlowT) -> FiveTuple:
    """Engine flow → store key type (equal to `FiveTuple(Proto(flow[0]), *flow[1:])`)."""
    proto = _PROTOS.get(flow[0])
    if proto is None:
        return FiveTuple(Proto(flow[0]), flow[1], flow[2], flow[3], flow[4])  # raises
    t: FiveTuple = _ft_new(FiveTuple)
    _ft_proto(t, proto)
    _ft_cip(t, flow[1])
    _ft_cport(t, flow[2])
    _ft_vip(t, flow[3])
    _ft_vport(t, flow[4])
    return t


def to_tuples(flows: Sequence[FlowT]) -> list[FiveTuple]:
    """`[to_tuple(f) for f in flows]` without a Python call per flow (~40% less per pin)."""
    out: list[FiveTuple] = []
    append = out.append
    new, cls, protos = _ft_new, FiveTuple, _PROTOS
    set_proto, set_cip, set_cport, set_vip, set_vport = (
        _ft_proto,
        _ft_cip,
        _ft_cport,
        _ft_vip,
        _ft_vport,
    )
    for flow in flows:
        proto = protos.get(flow[0])
        if proto is None:
            append(to_tuple(flow))  # raises
            continue
        t: FiveTuple = new(cls)
        set_proto(t, proto)
        set_cip(t, flow[1])
        set_cport(t, flow[2])
        set_vip(t, flow[3])
        set_vport(t, flow[4])
        append(t)
    return out


@dataclass(frozen=True, slots=True)
class CoreConfig:
    """Limits of the slow path."""

    pop: str
    """This POP's id, written into every record it pins."""
    store_ttl_ms: int = 300_000
    """TTL of a pinning in the store; refreshed by TOUCH events."""
    fin_linger_ms: int = 10_000
    """TTL left to a flow in the store after FIN/RST."""
    miss_queue_per_flow: int = 8
    """Packets held per unknown flow while its lookup runs; more are dropped and counted."""
    miss_queue_total: int = 10_000
    """Packets held in all; more are dropped and counted."""
    max_writes_per_s: int = 50_000
    """Cap of store writes (pins first, then releases, then touches); the rest is skipped."""
    max_batch: int = 512
    """Most flows in one store call."""
    write_linger_ms: int = 0
    """Pins, touches and releases wait up to this long for `max_batch` of them before they
    are written (they hold no packet, lookups never wait): a round costs a send and a
    receive per Redis master, more than a few pins do."""
    writeback_max: int = 100_000
    """Most pinnings kept for writing back after a store outage; oldest dropped beyond."""
    write_retry_ms: int = 500
    """Longest wait before the pins of a failed write batch are written again."""
    write_retry_min_ms: int = 10
    """First wait after a failed write batch; doubles with each failure in a row up to
    `write_retry_ms`. Only the failed pins (and other write-backs) wait; new pins go on."""
    lookup_patience_ms: int = 100
    """A failed lookup is retried while the flow's first queued packet is younger than this."""
    fallback: bool = True
    """When the store cannot answer in time: Maglev decides (True) or queued packets drop."""


@dataclass(slots=True)
class StoreWork:
    """One round of store calls the driver performs concurrently, each with its deadline."""

    lookups: list[FlowT] = field(default_factory=list)
    pins: list[tuple[FlowT, FlowRecord, int]] = field(default_factory=list)
    """(flow, record, ttl_ms)"""
    writebacks: set[FlowT] = field(default_factory=set)
    """Pins of flows already forwarded without the store: on NX conflict keep ours."""
    overwrites: set[FlowT] = field(default_factory=set)
    """Pins whose stored record names a dead backend: delete that record, then pin."""
    touches: list[FlowT] = field(default_factory=list)
    releases: list[FlowT] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.lookups or self.pins or self.touches or self.releases)


@dataclass(slots=True)
class _Vip:
    vip_id: int
    backends: frozenset[int]  # backend_ids a stored record may name (active and draining)
    usable: frozenset[int]  # those of `backends` not out of service (health checks)
    selectable: frozenset[int]  # those in the VIP's Maglev table (they get new flows)


class ForwardingCore:
    """Miss queues, store batching, record validation and Maglev fallback for one engine."""

    def __init__(self, engine: EngineLike, config: CoreConfig) -> None:
        self.engine = engine
        self.config = config
        self._vips: dict[tuple[bytes, int, int], _Vip] = {}
        self._backend_ids: dict[bytes, int] = {}
        self._backend_ips: dict[int, bytes] = {}
        # Flows waiting for a lookup: flow → queued frames (insertion order = age).
        self._queued: OrderedDict[FlowT, list[bytes]] = OrderedDict()
        self._queued_frames = 0
        self._first_miss: dict[FlowT, int] = {}
        self._in_flight: set[FlowT] = set()
        # Queued flows whose frames are all ICMP errors: they never create state.
        self._icmp_only: set[FlowT] = set()
        self._pins: OrderedDict[FlowT, int] = OrderedDict()  # flow → backend_id (NEW events)
        self._writeback: OrderedDict[FlowT, int] = OrderedDict()  # pins to retry after outage
        self._overwrite: set[FlowT] = set()  # writebacks replacing a record of a dead backend
        self._touches: OrderedDict[FlowT, None] = OrderedDict()
        self._releases: OrderedDict[FlowT, None] = OrderedDict()
        self._tokens = float(config.max_writes_per_s)
        self._tokens_at = 0
        # Write-backs (failed pins among them) wait until then; the wait doubles with each
        # failed write batch in a row, and a batch that succeeds ends the series.
        self._writeback_at = 0
        self._write_failures = 0
        # When the store loop first found pins, touches or releases waiting (None: none wait).
        self._linger_from: int | None = None
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "misses",
                "miss_queue_full",
                "lookups",
                "lookup_hits",
                "lookup_not_found",
                "lookup_failed",
                "lookup_retries",
                "dropped_no_store",
                "fallbacks",
                "record_rejected",
                "record_backend_down",
                "pins",
                "pins_adopted",
                "pin_failed",
                "writes_rate_limited",
                "writeback_conflicts",
                "writeback_dropped",
                "touches",
                "releases",
                "evictions",
                "icmp_misses",
                "icmp_stored",
                "icmp_maglev",
                "icmp_no_backend",
                "udp_lookup_first_new",
            ),
            0,
        )

    # ---- configuration -------------------------------------------------------------------

    def set_vip(
        self,
        vip_id: int,
        ip: bytes,
        port: int,
        proto: int,
        backends: Sequence[int],
        usable: Collection[int] | None = None,
        selectable: Collection[int] | None = None,
    ) -> None:
        """Declare a VIP and the backend_ids its stored records may name.

        `usable` (default: all of `backends`) leaves out backends that health checks found down
        for longer than the re-pin grace: a record naming one of them is not followed; the flow
        gets Maglev's choice, written over the dead record.

        `selectable` (default: `usable`): the backends in the VIP's Maglev table. A TCP flow
        started here (a SYN, `Event.NEW`) whose NX pin meets a record naming a backend outside
        it (down, drained) is a new connection reusing an old one's ports: our pick is written
        over that record instead of adopting it.
        """
        allowed = frozenset(backends)
        ok = allowed if usable is None else allowed & frozenset(usable)
        picks = ok if selectable is None else frozenset(selectable)
        self._vips[(ip, port, proto)] = _Vip(vip_id, allowed, ok, picks)

    def remove_vip(self, ip: bytes, port: int, proto: int) -> None:
        self._vips.pop((ip, port, proto), None)

    def set_backend_ids(self, ids: dict[bytes, int]) -> None:
        """Backend address (16 bytes) → backend_id, for every backend the engine knows."""
        self._backend_ids = dict(ids)
        self._backend_ips = {bid: ip for ip, bid in ids.items()}

    # ---- data path input -----------------------------------------------------------------

    def on_result(self, result: Any, now_ms: int = 0) -> None:
        """Take a processed batch's misses and events."""
        per_flow = self.config.miss_queue_per_flow
        for _vip_id, flow, frame, kind in result.misses:
            self.counters["misses"] += 1
            icmp = kind == MISS_ICMP
            if icmp:
                self.counters["icmp_misses"] += 1
            queue = self._queued.get(flow)
            if queue is None:
                if self._queued_frames >= self.config.miss_queue_total:
                    self.counters["miss_queue_full"] += 1
                    continue
                self._queued[flow] = [frame]
                self._queued_frames += 1
                self._first_miss[flow] = now_ms
                if icmp:
                    self._icmp_only.add(flow)
                else:
                    self._icmp_only.discard(flow)
            elif len(queue) < per_flow and self._queued_frames < self.config.miss_queue_total:
                queue.append(frame)
                self._queued_frames += 1
                if not icmp:
                    self._icmp_only.discard(flow)
            else:
                self.counters["miss_queue_full"] += 1
        pins, releases, touches = self._pins, self._releases, self._touches
        for event, flow, backend_id in result.events:
            if event == EVENT_NEW:  # one per new flow: kept to the bare minimum
                pins[flow] = backend_id
                if releases:
                    releases.pop(flow, None)
            elif event == EVENT_CLOSE:
                releases[flow] = None
                touches.pop(flow, None)
            elif event == EVENT_TOUCH:
                touches[flow] = None
            elif event == EVENT_EVICTED:
                self.counters["evictions"] += 1
        # Here, not only when writes are taken: without a store connection they never are,
        # and a SYN flood meanwhile would grow the queue without bound.
        self._trim_pins()

    @property
    def queued_frames(self) -> int:
        return self._queued_frames

    def has_work(self, now_ms: int, *, writes: bool = True) -> bool:
        """Whether `take_store_work` would return something now."""
        if len(self._queued) > len(self._in_flight):
            return True
        if not writes:
            return False
        self._refill(now_ms)
        if self._tokens < 1:
            return False
        if self._writeback and now_ms >= self._writeback_at:
            return True
        return self._writes_due(now_ms)

    def _writes_due(self, now_ms: int) -> bool:
        """Whether pins, touches and releases go out now: `max_batch` of them wait, or the
        oldest has waited `write_linger_ms` (counted from when the store loop first saw it)."""
        waiting = len(self._pins) + len(self._touches) + len(self._releases)
        if not waiting:
            self._linger_from = None
            return False
        if self._linger_from is None:
            self._linger_from = now_ms
        if self._writes_paused(now_ms):
            return False
        return (
            waiting >= self.config.max_batch
            or now_ms - self._linger_from >= self.config.write_linger_ms
        )

    def _writes_paused(self, now_ms: int) -> bool:
        return self._write_failures >= WRITE_FAILURES_TO_PAUSE and now_ms < self._writeback_at

    def writes_due_in(self, now_ms: int) -> int | None:
        """ms until writes that wait (lingering, or write-backs after a failure) are due;
        None if none wait. The driver sleeps no longer than this."""
        due: list[int] = []
        if self._writeback:
            due.append(self._writeback_at - now_ms)
        if self._linger_from is not None and (self._pins or self._touches or self._releases):
            at = self._linger_from + self.config.write_linger_ms
            if self._writes_paused(now_ms):
                at = max(at, self._writeback_at)
            due.append(at - now_ms)
        return max(0, min(due)) if due else None

    # ---- store work ----------------------------------------------------------------------

    def take_store_work(
        self, now_ms: int, wall_ms: int | None = None, *, writes: bool = True, flush: bool = False
    ) -> StoreWork:
        """Next round of store calls: lookups of queued flows, and (if `writes`) writes under
        the cap once due (`write_linger_ms`; at once if lookups go anyway); write-backs only
        once the wait after a failed write batch has passed. `flush` (at stop): no lookups,
        and writes are due at once."""
        work = StoreWork()
        limit = self.config.max_batch
        for flow in self._queued:
            if len(work.lookups) >= limit or flush:
                break
            if flow not in self._in_flight:
                work.lookups.append(flow)
                self._in_flight.add(flow)
        self.counters["lookups"] += len(work.lookups)
        if not writes:
            return work

        self._refill(now_ms)
        created = int(time.time() * 1000) if wall_ms is None else wall_ms
        ttl = self.config.store_ttl_ms
        # One record per (backend, VIP) in a round: they differ in nothing else, and the store
        # encodes a record object once per call (`pin_many`).
        records: dict[tuple[int, bytes], FlowRecord] = {}
        pop = self.config.pop
        due = self._writes_due(now_ms) or bool(work.lookups) or flush
        if due and self._pins:
            self._take_pins(work.pins, limit, records, created, ttl)
        sources = [self._writeback] if now_ms >= self._writeback_at else []
        for source in sources:
            while source and len(work.pins) < limit and self._tokens >= 1:
                flow, backend_id = source.popitem(last=False)
                overwrite = source is self._writeback and flow in self._overwrite
                if overwrite:
                    self._overwrite.discard(flow)
                rec = records.get((backend_id, flow[3]))
                if rec is None:
                    backend = self._backend_ips.get(backend_id)
                    if backend is None:
                        continue
                    rec = records[backend_id, flow[3]] = FlowRecord(backend, flow[3], created, pop)
                work.pins.append((flow, rec, ttl))
                if source is self._writeback:
                    work.writebacks.add(flow)
                if overwrite:
                    work.overwrites.add(flow)
                self._tokens -= 1
        while due and self._releases and len(work.releases) < limit and self._tokens >= 1:
            work.releases.append(self._releases.popitem(last=False)[0])
            self._tokens -= 1
        while due and self._touches and len(work.touches) < limit and self._tokens >= 1:
            work.touches.append(self._touches.popitem(last=False)[0])
            self._tokens -= 1
        if not (self._pins or self._touches or self._releases):
            self._linger_from = None
        self._trim_pins()
        self.counters["pins"] += len(work.pins)
        self.counters["touches"] += len(work.touches)
        self.counters["releases"] += len(work.releases)
        return work

    def _take_pins(
        self,
        out: list[tuple[FlowT, FlowRecord, int]],
        limit: int,
        records: dict[tuple[int, bytes], FlowRecord],
        created: int,
        ttl: int,
    ) -> None:
        """Move the oldest NEW pins into `out` (up to `limit` in all, one write token each;
        pins of a backend no longer known are dropped without one). In bulk: one new flow
        costs one pass of this loop, not a `popitem` and the checks of write-backs."""
        pins = self._pins
        pop = self.config.pop
        backend_ips = self._backend_ips
        append = out.append
        taken = 0
        while pins:
            room = min(limit - len(out), int(self._tokens) - taken)
            if room <= 0:
                break
            if room >= len(pins):
                batch = list(pins.items())
                pins.clear()
            else:
                batch = list(islice(pins.items(), room))
                for flow, _ in batch:
                    del pins[flow]
            for flow, backend_id in batch:
                vip = flow[3]
                rec = records.get((backend_id, vip))
                if rec is None:
                    backend = backend_ips.get(backend_id)
                    if backend is None:
                        continue
                    rec = records[backend_id, vip] = FlowRecord(backend, vip, created, pop)
                append((flow, rec, ttl))
                taken += 1
        self._tokens -= taken

    def _trim_pins(self) -> None:
        """Past the cap, pins of a flood are dropped rather than queued without bound: the
        flows still work locally and Maglev gives other POPs the same answer."""
        overflow = len(self._pins) - 4 * self.config.max_writes_per_s
        if overflow > 0:
            pins = self._pins
            for flow in list(islice(pins, overflow)):
                del pins[flow]
            self.counters["writes_rate_limited"] += overflow

    def _refill(self, now_ms: int) -> None:
        rate = self.config.max_writes_per_s
        if self._tokens_at:
            self._tokens = min(float(rate), self._tokens + (now_ms - self._tokens_at) * rate / 1000)
        self._tokens_at = now_ms

    def _valid_backend(self, flow: FlowT, rec: FlowRecord) -> int | None:
        """backend_id of a stored record if this VIP may use it, else None (rejected)."""
        vip = self._vips.get((flow[3], flow[4], flow[0]))
        bid = self._backend_ids.get(rec.backend_ip)
        if vip is None or bid is None or bid not in vip.backends or rec.vip_ip != flow[3]:
            self.counters["record_rejected"] += 1
            _log_flow("record_rejected", flow, backend=rec.backend, pinned_by=rec.pop)
            return None
        if bid not in vip.usable:
            self.counters["record_backend_down"] += 1
            return None
        return bid

    def _names_dead_backend(self, flow: FlowT, rec: FlowRecord) -> bool:
        """Whether `rec` names a backend of the flow's VIP that is out of service."""
        vip = self._vips.get((flow[3], flow[4], flow[0]))
        bid = self._backend_ids.get(rec.backend_ip)
        return vip is not None and bid in vip.backends and bid not in vip.usable

    def _fallback(self, flow: FlowT) -> int:
        vip = self._vips.get((flow[3], flow[4], flow[0]))
        if vip is None:
            return -1
        self.counters["fallbacks"] += 1
        backend_id = self.engine.maglev_pick(vip.vip_id, to_tuple(flow).hash64())
        _log_flow("maglev_fallback", flow, backend_id=backend_id)
        return backend_id

    def on_lookups(
        self, flows: Sequence[FlowT], records: Sequence[LookupResult] | None, now_ms: int
    ) -> Any:
        """Install the answers (None = the store failed) and re-run the flows' queued frames.

        An item `LOOKUP_FAILED` (its Redis master could not answer) is a failure of that flow
        alone, handled as if the whole batch had failed; the other items are installed.

        Returns the engine's Result for the re-run frames (its `tx` is what to send).
        """
        frames: list[bytes] = []
        stateless: dict[int, list[bytes]] = {}  # backend_id → ICMP errors forwarded statelessly
        patience = self.config.lookup_patience_ms
        for i, flow in enumerate(flows):
            self._in_flight.discard(flow)
            backend_id: int | None = None
            udp_start = False
            rec = records[i] if records is not None else LOOKUP_FAILED
            if rec is LOOKUP_FAILED:
                rec = None
                self.counters["lookup_failed"] += 1
                if now_ms - self._first_miss.get(flow, now_ms) < patience:
                    self.counters["lookup_retries"] += 1
                    continue  # still queued: the next round asks again
                if not self.config.fallback:
                    dropped = self._queued.pop(flow, [])
                    self._icmp_only.discard(flow)
                    self._queued_frames -= len(dropped)
                    self._first_miss.pop(flow, None)
                    self.counters["dropped_no_store"] += len(dropped)
                    continue
            elif rec is None:
                self.counters["lookup_not_found"] += 1
                # Only lookup-first VIPs hold a UDP datagram for its lookup: a flow start.
                udp_start = flow[0] == IPPROTO_UDP
            else:
                self.counters["lookup_hits"] += 1
                backend_id = self._valid_backend(flow, rec)
                if backend_id is not None:
                    _log_flow("store_hit", flow, backend=rec.backend, pinned_by=rec.pop)
            if flow in self._icmp_only and self.engine.lookup(flow) is None:
                # Only ICMP errors quote this flow here: they go to the stored backend (a flow
                # pinned before a route move: PMTU must reach it) or Maglev's choice, and never
                # install a flow or write a pinning (a storm quoting random flows must not).
                self._icmp_only.discard(flow)
                self._first_miss.pop(flow, None)
                held = self._queued.pop(flow, [])
                self._queued_frames -= len(held)
                if backend_id is None:
                    backend_id = self._maglev_choice(flow)
                    self.counters["icmp_maglev" if backend_id >= 0 else "icmp_no_backend"] += 1
                else:
                    self.counters["icmp_stored"] += 1
                stateless.setdefault(backend_id, []).extend(held)
                continue
            self._icmp_only.discard(flow)
            if udp_start:
                # Not in the store: a new flow, pinned NX like Event.NEW (the stored record is
                # adopted if another POP pinned it meanwhile), not a fallback.
                backend_id = self._maglev_choice(flow)
                if backend_id >= 0:
                    self.counters["udp_lookup_first_new"] += 1
                    self._pins[flow] = backend_id
                    self._releases.pop(flow, None)
            elif backend_id is None:
                backend_id = self._fallback(flow)
                if backend_id >= 0:
                    # Not in the store (lost in a failover, or pinned during an outage):
                    # write our choice so that the next POP agrees with us.
                    self._remember_writeback(flow, backend_id)
                    if rec is not None and self._names_dead_backend(flow, rec):
                        # Its backend is dead: the flow moves for good, and so must the record
                        # (NX alone would keep the dead one and send other POPs after it).
                        self._overwrite.add(flow)
            if backend_id >= 0 and self.engine.lookup(flow) is None:
                self.engine.install(flow, backend_id, now_ms)
            self._first_miss.pop(flow, None)
            queued = self._queued.pop(flow, None)
            if queued:
                self._queued_frames -= len(queued)
                frames.extend(queued)
        result = self.engine.process(frames, now_ms) if frames else None
        for backend_id, held in stateless.items():
            out = self.engine.forward_to(held, backend_id)  # -1: DROP_NO_BACKEND
            if result is None:
                result = out
            else:
                result.tx.extend(out.tx)
        return result

    def _maglev_choice(self, flow: FlowT) -> int:
        """Maglev's backend for `flow` (-1: none), not counted as a fallback."""
        vip = self._vips.get((flow[3], flow[4], flow[0]))
        if vip is None:
            return -1
        return self.engine.maglev_pick(vip.vip_id, to_tuple(flow).hash64())

    def _remember_writeback(self, flow: FlowT, backend_id: int) -> None:
        self._writeback[flow] = backend_id
        self._writeback.move_to_end(flow)
        while len(self._writeback) > self.config.writeback_max:
            self._overwrite.discard(self._writeback.popitem(last=False)[0])
            self.counters["writeback_dropped"] += 1

    def on_pins(self, work: StoreWork, stored: Sequence[FlowRecord] | None, now_ms: int) -> None:
        """Adopt records that won the NX race; keep failed pins for write-back.

        A failed batch does not stop other writes: its pins are written back (NX conflicts
        keep ours: their packets went to ours meanwhile) after a wait that doubles with each
        failed batch in a row, from `write_retry_min_ms` up to `write_retry_ms`. From the
        `WRITE_FAILURES_TO_PAUSE`th failure in a row every write waits that long.
        """
        if stored is None:
            cfg = self.config
            wait = min(cfg.write_retry_ms, cfg.write_retry_min_ms << min(self._write_failures, 16))
            self._write_failures += 1
            self._writeback_at = max(self._writeback_at, now_ms + wait)
            self.counters["pin_failed"] += len(work.pins)
            for flow, rec, _ttl in work.pins:
                bid = self._backend_ids.get(rec.backend_ip)
                if bid is not None:
                    self._remember_writeback(flow, bid)
                    if flow in work.overwrites:
                        self._overwrite.add(flow)
            return
        self._write_failures = 0
        if len(stored) == len(work.pins) and all(map(is_, stored, map(_second, work.pins))):
            return  # every pin won: the store gave back our own records (the common case)
        for (flow, ours, _ttl), theirs in zip(work.pins, stored, strict=True):
            if theirs.backend_ip == ours.backend_ip:
                continue
            if flow in work.writebacks:
                # Packets already went to our choice while the store was away; moving the
                # flow now would break it wherever it lives. Keep ours and count it.
                self.counters["writeback_conflicts"] += 1
                continue
            entry = self.engine.lookup(flow)
            if entry is None:
                continue
            bid = self._valid_backend(flow, theirs)
            if bid is None:
                if self._names_dead_backend(flow, theirs):
                    # The flow's first packet here after its backend died (a UDP datagram, or
                    # a SYN reusing the ports of a dead connection): ours replaces it.
                    self._remember_writeback(flow, entry[0])
                    self._overwrite.add(flow)
                continue
            if (
                flow[0] == IPPROTO_TCP
                and bid not in self._vips[flow[3], flow[4], flow[0]].selectable
            ):
                # Only a SYN starts a TCP flow, and no POP picks this backend for one now (down
                # within the re-pin grace, drained): the record is an old connection's on the
                # same ports (the engine re-picked it, DATAPATH.md clarification 6). Ours wins.
                _log_flow("pin_overwrites", flow, backend=theirs.backend, pinned_by=theirs.pop)
                self._remember_writeback(flow, entry[0])
                self._overwrite.add(flow)
                continue
            self.counters["pins_adopted"] += 1
            _log_flow("pin_adopted", flow, backend=theirs.backend, pinned_by=theirs.pop)
            self.engine.install(flow, bid, now_ms)

    def requeue_failed_lookups(self, flows: Sequence[FlowT]) -> None:
        """A lookup batch was cancelled (shutdown): let its flows be looked up again."""
        for flow in flows:
            self._in_flight.discard(flow)


def _log_flow(event: str, flow: FlowT, **fields: object) -> None:
    """One structured debug line per flow event: `event=... flow="..." k=v ...`."""
    if flow_log.isEnabledFor(logging.DEBUG):
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        flow_log.debug('event=%s flow="%s" %s', event, to_tuple(flow), extra)
