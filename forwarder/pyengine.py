"""The data-path `Engine` in pure Python: the reference for `_fastpath.c` (forwarder/DATAPATH.md).

Same parsing order, verdicts, flow table (buckets of 8 slots, LRU eviction), events and output
bytes as the C engine; also the `impl = "python"` data path. Clear first, then not slow.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Sequence
from typing import NamedTuple

import mmh3

from flowstate.errors import UsageError
from flowstate.flow import HASH_SEED, flow_key
from forwarder.packet import (
    BUCKET_SLOTS,
    ENCAP_OVERHEAD,
    ICMP_BUDGET,
    IPPROTO_FRAGMENT,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_IPIP,
    IPPROTO_IPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPV6_EXT_HEADERS,
    IPV6_MIN_MTU,
    MAX_EXT_HEADERS,
    MISS_ICMP,
    MISS_PACKET,
    REPLY,
    STATE_CLOSING,
    STATE_ESTABLISHED,
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    TP_STATUS_CSUMNOTREADY,
    Event,
    Verdict,
    checksum,
    icmp4_too_big_packet,
    icmp6_too_big_packet,
)

#: A flow as the engine reports it: (proto, client_ip, client_port, vip_ip, vip_port).
FlowT = tuple[int, bytes, int, bytes, int]
#: `(vip_id, flow, whole input frame, MISS_PACKET | MISS_ICMP)`.
MissT = tuple[int, FlowT, bytes, int]

_NO_BACKEND_ENTRY = 0xFFFF
_MAX_BACKEND_ID = 0xFFFE
_MAX_VIP_ID = 0xFF
_MAX_CAPACITY = 1 << 24
_MAX_TABLE = 1 << 24
#: Timeouts fit 31 bits (the C table keeps 32-bit `last_seen` ages exact with that bound).
_MAX_TIMEOUT_MS = (1 << 31) - 1
_MASK64 = (1 << 64) - 1
#: The table epoch (`fp_table_clock`): now stays within [epoch, epoch + SPAN).
_EPOCH_SPAN, _EPOCH_LEAD = 1 << 31, 1 << 30
#: Largest IPv6 answer to a too-big IPv6 packet (RFC 4443 2.4c): 40 + 8 + quote.
_ICMP6_MAX_QUOTE = IPV6_MIN_MTU - 40 - 8

_OUTER = struct.Struct("!IHBB16s16s")
_CANON = struct.Struct("!BBHH")
_PORTS = struct.Struct("!HH")
_CSUM = struct.Struct("!H")

EVENT_NEW, EVENT_CLOSE, EVENT_TOUCH, EVENT_EVICTED = (e.value for e in Event)

# Results of walking an IPv6 extension chain.
_EXT_OK, _EXT_TOO_LONG, _EXT_TRUNCATED, _EXT_FRAGMENT = 0, 1, 2, 3


class Result(NamedTuple):
    """What one `process` call did; see DATAPATH.md "Engine API"."""

    verdicts: bytes
    """One `Verdict` code per input frame."""
    tx: list[tuple[int, bytes]]
    """`(backend_id, outer IPv6 + inner L3 packet)`, or `(REPLY, Ethernet frame)`."""
    misses: list[MissT]
    """`(vip_id, flow, whole input frame, kind)` of unknown flows that are not flow starts;
    kind MISS_ICMP for an ICMP error quoting the flow, else MISS_PACKET."""
    events: list[tuple[int, FlowT, int]]
    """`(Event, flow, backend_id)`."""


def flow_hash64(flow: FlowT) -> int:
    """`FiveTuple.hash64()` of an engine flow tuple (h1 of mmh3 x64_128 of the canonical bytes)."""
    proto, client_ip, client_port, vip_ip, vip_port = flow
    family = 4 if len(client_ip) == 4 else 6
    canonical = _CANON.pack(family, proto, client_port, vip_port) + client_ip + vip_ip
    # Keywords on purpose: mmh3 5.x ignores a positional `signed` argument.
    h1: int = mmh3.hash64(canonical, seed=HASH_SEED, x64arch=True, signed=False)[0]
    return h1


def mix64(k: int) -> int:
    """MurmurHash3's 64-bit finalizer (`fp_mix64`): a flow's second bucket is `(mix64(hash64) *
    n_buckets) >> 64`."""
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & _MASK64
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & _MASK64
    return k ^ (k >> 33)


def _walk_ext(f: bytes, p: int, end: int, nh: int, check_fragment: bool) -> tuple[int, int, int]:
    """Skip IPv6 extension headers from offset `p`: `(_EXT_* status, next header, L4 offset)`."""
    count = 0
    while nh in IPV6_EXT_HEADERS:
        if count == MAX_EXT_HEADERS:
            return _EXT_TOO_LONG, nh, p
        count += 1
        if nh == IPPROTO_FRAGMENT:
            if p + 8 > end:
                return _EXT_TRUNCATED, nh, p
            if check_fragment and ((f[p + 2] << 8) | f[p + 3]) & 0xFFF8:
                return _EXT_FRAGMENT, nh, p
            nh = f[p]
            p += 8
        else:
            if p + 2 > end:
                return _EXT_TRUNCATED, nh, p
            size = 8 * (f[p + 1] + 1)
            if p + size > end:
                return _EXT_TRUNCATED, nh, p
            nh = f[p]
            p += size
    return _EXT_OK, nh, p


def _complete_checksum(f: bytes, l4: int, end: int, proto: int) -> bytes:
    """`f` with the TCP/UDP checksum completed (the field holds the pseudo-header sum)."""
    value = checksum(f[l4:end])
    if proto == IPPROTO_UDP:
        at = l4 + 6
        if value == 0:
            value = 0xFFFF
    else:
        at = l4 + 16
    return f[:at] + _CSUM.pack(value) + f[at + 2 :]


def _check_flow(flow: FlowT) -> FlowT:
    try:
        proto, client_ip, client_port, vip_ip, vip_port = flow
    except (TypeError, ValueError):
        raise UsageError(f"flow must be a 5-tuple, got {flow!r}") from None
    if proto not in (IPPROTO_TCP, IPPROTO_UDP):
        raise UsageError(f"flow protocol must be 6 or 17, got {proto!r}")
    if not (isinstance(client_ip, bytes) and isinstance(vip_ip, bytes)):
        raise UsageError("flow addresses must be bytes")
    if len(client_ip) not in (4, 16) or len(client_ip) != len(vip_ip):
        raise UsageError("flow addresses must both be 4 or both 16 bytes")
    for port in (client_port, vip_port):
        if not isinstance(port, int) or not 0 <= port <= 0xFFFF:
            raise UsageError(f"flow port must be 0..65535, got {port!r}")
    return (int(proto), client_ip, client_port, vip_ip, vip_port)


def _check_range(what: str, value: int, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise UsageError(f"{what} must be an integer {low}..{high}, got {value!r}")


class Engine:
    """Pure-Python data path: parse, classify, look up, encapsulate; see DATAPATH.md."""

    #: Approximate bytes per table slot: six list cells plus the key tuple and its index entry.
    entry_size = 256

    def __init__(
        self,
        *,
        source_ipv6: bytes,
        capacity: int,
        tcp_idle_ms: int,
        udp_idle_ms: int,
        fin_linger_ms: int,
        touch_interval_ms: int,
        tunnel_mtu: int = 1500,
    ) -> None:
        if not isinstance(source_ipv6, bytes) or len(source_ipv6) != 16:
            raise UsageError("source_ipv6 must be 16 packed bytes")
        _check_range("capacity", capacity, 1, _MAX_CAPACITY)
        for name, value in (
            ("tcp_idle_ms", tcp_idle_ms),
            ("udp_idle_ms", udp_idle_ms),
            ("fin_linger_ms", fin_linger_ms),
            ("touch_interval_ms", touch_interval_ms),
        ):
            _check_range(name, value, 0, _MAX_TIMEOUT_MS)
        _check_range("tunnel_mtu", tunnel_mtu, IPV6_MIN_MTU, 0xFFFF)
        self._source = source_ipv6
        self._idle = {IPPROTO_TCP: tcp_idle_ms, IPPROTO_UDP: udp_idle_ms}
        self._fin_linger = fin_linger_ms
        self._touch_interval = touch_interval_ms
        self._mtu = tunnel_mtu

        self._vips: dict[int, tuple[bytes, int, int]] = {}  # vip_id -> (ip, port, proto)
        self._services: dict[tuple[bytes, int, int], int] = {}  # (ip, port, proto) -> vip_id
        self._vip_addresses: dict[bytes, int] = {}  # ip -> number of VIPs on it
        self._lookup_first: set[int] = set()  # vip_ids whose unknown UDP flows are misses
        self._tables: dict[int, array[int]] = {}
        # Per VIP, the backend_ids present in its Maglev table (usable for new flows).
        self._members: dict[int, frozenset[int]] = {}
        self._backends: dict[int, bytes] = {}
        self._links: dict[int, tuple[bytes, bytes, int, int]] = {}

        self._n_buckets = -(-capacity // BUCKET_SLOTS)
        slots = self._n_buckets * BUCKET_SLOTS
        self._slots = slots
        # The table: flat lists indexed by slot = bucket * 8 + i; `_index` maps key -> slot
        # (the bucket never holds a key twice) so a hit costs one dict lookup.
        self._keys: list[FlowT | None] = [None] * slots
        self._backend: list[int] = [0] * slots
        self._state: list[int] = [0] * slots
        self._expires: list[int] = [0] * slots
        self._touch_due: list[int] = [0] * slots
        self._last_seen: list[int] = [0] * slots
        self._index: dict[FlowT, int] = {}
        self._hand = 0
        self._epoch = 0  # the C slots store expires - epoch in 32 bits; see _clock

        self._verdict_counts = [0] * 256
        self._evicted = 0
        self._expired = 0
        self._budget = ICMP_BUDGET
        self._forced: int | None = None  # backend of the running `forward_to` call
        self._forwarded_to = 0

    # --- configuration ---------------------------------------------------------------------------

    def set_vip(
        self, vip_id: int, ip: bytes, port: int, proto: int, *, udp_lookup_first: bool = False
    ) -> None:
        """Configure VIP `vip_id`; changing its (ip, port, proto) drops the old triple's flows.

        `udp_lookup_first`: a UDP datagram of a flow not in the table is a MISS (the slow path
        asks the store first) instead of a flow start; no effect on a TCP VIP.
        """
        _check_range("vip_id", vip_id, 0, _MAX_VIP_ID)
        if not isinstance(ip, bytes) or len(ip) not in (4, 16):
            raise UsageError("VIP ip must be 4 or 16 packed bytes")
        _check_range("VIP port", port, 0, 0xFFFF)
        if proto not in (IPPROTO_TCP, IPPROTO_UDP):
            raise UsageError(f"VIP proto must be 6 or 17, got {proto!r}")
        triple = (ip, port, proto)
        owner = self._services.get(triple)
        if owner is not None and owner != vip_id:
            raise UsageError(f"VIP {ip.hex()}:{port}/{proto} is already vip_id {owner}")
        old = self._vips.get(vip_id)
        if udp_lookup_first:
            self._lookup_first.add(vip_id)
        else:
            self._lookup_first.discard(vip_id)
        if old == triple:
            return
        if old is not None:
            self._forget_vip(old)
        self._vips[vip_id] = triple
        self._services[triple] = vip_id
        self._vip_addresses[ip] = self._vip_addresses.get(ip, 0) + 1

    def remove_vip(self, vip_id: int) -> int:
        """Forget VIP `vip_id` and its Maglev table; drop its flows and return how many."""
        _check_range("vip_id", vip_id, 0, _MAX_VIP_ID)
        self._tables.pop(vip_id, None)
        self._members.pop(vip_id, None)
        self._lookup_first.discard(vip_id)
        triple = self._vips.pop(vip_id, None)
        return 0 if triple is None else self._forget_vip(triple)

    def _forget_vip(self, triple: tuple[bytes, int, int]) -> int:
        ip, port, proto = triple
        del self._services[triple]
        left = self._vip_addresses[ip] - 1
        if left:
            self._vip_addresses[ip] = left
        else:
            del self._vip_addresses[ip]
        return self._drop_flows(
            [s for k, s in self._index.items() if k[0] == proto and k[3] == ip and k[4] == port]
        )

    def set_backend(
        self,
        backend_id: int,
        ip: bytes,
        *,
        dst_mac: bytes = b"",
        src_mac: bytes = b"",
        ifindex: int = 0,
        mtu: int = 0,
    ) -> None:
        """Configure backend `backend_id` (IPv6 tunnel endpoint); link info is for TX only."""
        _check_range("backend_id", backend_id, 0, _MAX_BACKEND_ID)
        if not isinstance(ip, bytes) or len(ip) != 16:
            raise UsageError("backend ip must be 16 packed bytes (IPv6)")
        for mac in (dst_mac, src_mac):
            if not isinstance(mac, bytes) or len(mac) not in (0, 6):
                raise UsageError("MAC addresses must be empty or 6 bytes")
        _check_range("ifindex", ifindex, 0, 0x7FFFFFFF)
        _check_range("mtu", mtu, 0, 0xFFFF)
        self._backends[backend_id] = ip
        self._links[backend_id] = (dst_mac, src_mac, ifindex, mtu)

    def backend_link(self, backend_id: int) -> tuple[int, bytes, bytes, int] | None:
        """TX link of a backend as `(ifindex, src_mac, dst_mac, mtu)`, None if unresolved/unknown.

        Same answer as the C engine's, for the Python packet ring.
        """
        link = self._links.get(backend_id)
        if link is None or not link[2] or not link[0]:
            return None
        dst_mac, src_mac, ifindex, mtu = link
        return ifindex, src_mac, dst_mac, mtu

    def remove_backend(self, backend_id: int) -> int:
        """Forget a backend; drop the flows pinned to it and return how many."""
        _check_range("backend_id", backend_id, 0, _MAX_BACKEND_ID)
        if self._backends.pop(backend_id, None) is None:
            return 0
        del self._links[backend_id]
        backend = self._backend
        return self._drop_flows([s for s in self._index.values() if backend[s] == backend_id])

    def set_maglev(self, vip_id: int, table: bytes) -> None:
        """Install a VIP's Maglev lookup table (`array('H')` bytes of backend_ids; b"": none)."""
        _check_range("vip_id", vip_id, 0, _MAX_VIP_ID)
        if len(table) % 2 or len(table) > 2 * _MAX_TABLE:
            raise UsageError("Maglev table must be array('H') bytes of at most 2**24 entries")
        if not table:
            self._tables.pop(vip_id, None)
            self._members.pop(vip_id, None)
            return
        entries = array("H")
        entries.frombytes(bytes(table))
        self._tables[vip_id] = entries
        self._members[vip_id] = frozenset(entries) - {_NO_BACKEND_ENTRY}

    def flow_keys(self, flows: Sequence[FlowT]) -> list[bytes]:
        """Each flow's Redis key (`FiveTuple.key()`: KEY_PREFIX + its 16-byte digest)."""
        out = []
        for flow in flows:
            proto, client_ip, client_port, vip_ip, vip_port = _check_flow(flow)
            family = 4 if len(client_ip) == 4 else 6
            out.append(
                flow_key(_CANON.pack(family, proto, client_port, vip_port) + client_ip + vip_ip)
            )
        return out

    def maglev_pick(self, vip_id: int, hash64: int) -> int:
        """The backend a flow start with `hash64` would get on VIP `vip_id`, or -1."""
        _check_range("vip_id", vip_id, 0, _MAX_VIP_ID)
        _check_range("hash64", hash64, 0, (1 << 64) - 1)
        return self._pick(vip_id, hash64)

    def _pick(self, vip_id: int, hash64: int) -> int:
        table = self._tables.get(vip_id)
        if table is None:
            return -1
        backend_id = table[hash64 % len(table)]
        if backend_id == _NO_BACKEND_ENTRY or backend_id not in self._backends:
            return -1
        return backend_id

    # --- flow table ------------------------------------------------------------------------------

    def install(self, flow: FlowT, backend_id: int, now_ms: int) -> None:
        """Pin `flow` to `backend_id` as ESTABLISHED (after a store lookup or a fallback)."""
        flow = _check_flow(flow)
        if (flow[3], flow[4], flow[0]) not in self._services:
            raise UsageError("install: the flow's (vip_ip, vip_port, proto) is not a VIP")
        if backend_id not in self._backends:
            raise UsageError(f"install: unknown backend_id {backend_id!r}")
        self._clock(now_ms)
        self._insert(flow, flow_hash64(flow), backend_id, now_ms, None)

    def lookup(self, flow: FlowT) -> tuple[int, int, int] | None:
        """`(backend_id, state, expires_ms)` of an occupied slot holding `flow`, else None."""
        slot = self._index.get(_check_flow(flow))
        if slot is None:
            return None
        return self._backend[slot], self._state[slot], self._expires[slot]

    def expire(self, now_ms: int, budget: int) -> list[FlowT]:
        """Move the clock hand over `min(budget, slots)` slots; clear and return expired flows."""
        _check_range("budget", budget, 0, 1 << 62)
        self._clock(now_ms)
        keys, expires, index = self._keys, self._expires, self._index
        hand, slots = self._hand, self._slots
        cleared: list[FlowT] = []
        for _ in range(min(budget, slots)):
            key = keys[hand]
            if key is not None and expires[hand] <= now_ms:
                keys[hand] = None
                del index[key]
                cleared.append(key)
            hand += 1
            if hand == slots:
                hand = 0
        self._hand = hand
        self._expired += len(cleared)
        return cleared

    def counters(self) -> dict[str, int]:
        """Every verdict's count (lower-case name) plus table stats."""
        out = {v.name.lower(): self._verdict_counts[v] for v in Verdict}
        out["flows"] = len(self._index)
        out["capacity"] = self._slots
        out["evicted"] = self._evicted
        out["expired"] = self._expired
        out["forward_to"] = self._forwarded_to
        return out

    def __len__(self) -> int:
        return len(self._index)

    def _drop_flows(self, slots: list[int]) -> int:
        for slot in slots:
            key = self._keys[slot]
            assert key is not None
            del self._index[key]
            self._keys[slot] = None
        return len(slots)

    def _clock(self, now: int) -> None:
        """The C table's epoch (DATAPATH.md clarification 7), whose moves clear slots.

        Keeps `now` within [epoch, epoch + 2**31); else the epoch becomes max(0, now - 2**30)
        and every slot whose expiry falls outside [epoch, epoch + 2**32) is cleared without
        being reported. Called where the C engine calls `fp_table_clock`.
        """
        epoch = self._epoch
        if epoch <= now < epoch + _EPOCH_SPAN:
            return
        epoch = max(0, now - _EPOCH_LEAD)
        keys, expires, index = self._keys, self._expires, self._index
        for slot, key in enumerate(keys):
            if key is not None and not epoch <= expires[slot] <= epoch + 0xFFFFFFFF:
                keys[slot] = None
                del index[key]
        self._epoch = epoch

    def _bucket_bases(self, hash64: int) -> tuple[int, ...]:
        """First slots of a flow's candidate buckets: b1, then b2 unless it is b1."""
        b1 = hash64 % self._n_buckets
        b2 = (mix64(hash64) * self._n_buckets) >> 64
        return (b1 * BUCKET_SLOTS,) if b2 == b1 else (b1 * BUCKET_SLOTS, b2 * BUCKET_SLOTS)

    def _insert(
        self,
        flow: FlowT,
        hash64: int,
        backend_id: int,
        now: int,
        events: list[tuple[int, FlowT, int]] | None,
    ) -> None:
        """Write `flow` as a fresh ESTABLISHED entry (DATAPATH.md clarification 5)."""
        keys, expires = self._keys, self._expires
        slot = self._index.get(flow)
        if slot is None:
            # Two candidate buckets; the one with more free (empty or expired) slots takes the
            # flow (ties: b1), else the least recently seen of both is evicted (ties: b1 first).
            bases = self._bucket_bases(hash64)
            free: list[list[int]] = [[], []]
            for j, base in enumerate(bases):
                free[j] = [
                    i
                    for i in range(base, base + BUCKET_SLOTS)
                    if keys[i] is None or expires[i] <= now
                ]
            chosen = free[1] if len(free[1]) > len(free[0]) else free[0]
            if chosen:
                slot = chosen[0]
                old = keys[slot]
                if old is not None:
                    del self._index[old]
            else:
                last_seen = self._last_seen
                candidates = [i for base in bases for i in range(base, base + BUCKET_SLOTS)]
                slot = min(candidates, key=last_seen.__getitem__)
                victim = keys[slot]
                assert victim is not None
                del self._index[victim]
                self._evicted += 1
                if events is not None:
                    events.append((EVENT_EVICTED, victim, self._backend[slot]))
            keys[slot] = flow
            self._index[flow] = slot
        self._backend[slot] = backend_id
        self._state[slot] = STATE_ESTABLISHED
        expires[slot] = now + self._idle[flow[0]]
        self._touch_due[slot] = now + self._touch_interval
        self._last_seen[slot] = now

    # --- the data path ---------------------------------------------------------------------------

    def process(
        self, frames: Sequence[bytes], now_ms: int, statuses: Sequence[int] | None = None
    ) -> Result:
        """Classify a batch of Ethernet frames; see DATAPATH.md for every verdict."""
        if statuses is not None and len(statuses) != len(frames):
            raise UsageError(f"{len(statuses)} statuses for {len(frames)} frames")
        verdicts = bytearray(len(frames))
        tx: list[tuple[int, bytes]] = []
        misses: list[MissT] = []
        events: list[tuple[int, FlowT, int]] = []
        counts = self._verdict_counts
        self._budget = ICMP_BUDGET
        for i, f in enumerate(frames):
            if type(f) is not bytes:
                f = bytes(f)
            status = statuses[i] if statuses is not None else 0
            v = self._frame(f, status, now_ms, tx, misses, events)
            verdicts[i] = v
            counts[v] += 1
        return Result(bytes(verdicts), tx, misses, events)

    def forward_to(self, frames: Sequence[bytes], backend_id: int) -> Result:
        """Encapsulate `frames` (e.g. queued ICMP errors) to `backend_id`, table untouched.

        Each frame is parsed and checked as by `process` (same drop/pass verdicts, too-big rule
        and ICMP budget); one of a configured service is FORWARD to `backend_id` without a table
        lookup, insert, refresh or event, or DROP_NO_BACKEND if `backend_id` is -1 or not set.
        Never reports misses or events; frames are taken as they are (no checksum completion).
        """
        _check_range("backend_id", backend_id, -1, _MAX_BACKEND_ID)
        self._forced = backend_id
        try:
            return self.process(frames, 0)
        finally:
            self._forced = None

    def _frame(
        self,
        f: bytes,
        status: int,
        now: int,
        tx: list[tuple[int, bytes]],
        misses: list[MissT],
        events: list[tuple[int, FlowT, int]],
    ) -> int:
        n = len(f)
        if n < 14:
            return Verdict.DROP_ETH_SHORT
        etype = (f[12] << 8) | f[13]
        off = 14
        for _ in range(2):
            if etype != 0x8100 and etype != 0x88A8:
                break
            if n < off + 4:
                return Verdict.DROP_ETH_SHORT
            etype = (f[off + 2] << 8) | f[off + 3]
            off += 4
        avail = n - off

        if etype == 0x0800:
            if avail < 20:
                return Verdict.DROP_IP4_SHORT
            vihl = f[off]
            if vihl >> 4 != 4:
                return Verdict.DROP_IP4_VERSION
            hlen = (vihl & 0x0F) * 4
            if hlen < 20 or hlen > avail:
                return Verdict.DROP_IP4_IHL
            total = (f[off + 2] << 8) | f[off + 3]
            if total < hlen or total > avail:
                return Verdict.DROP_IP4_LENGTH
            dst = f[off + 16 : off + 20]
            if dst not in self._vip_addresses:
                return Verdict.PASS_NOT_VIP
            if ((f[off + 6] << 8) | f[off + 7]) & 0x1FFF:
                return Verdict.DROP_FRAGMENT
            proto = f[off + 9]
            tclass = f[off + 1]
            l4 = off + hlen
        elif etype == 0x86DD:
            if avail < 40:
                return Verdict.DROP_IP6_SHORT
            if f[off] >> 4 != 6:
                return Verdict.DROP_IP6_VERSION
            plen = (f[off + 4] << 8) | f[off + 5]
            if plen == 0 or 40 + plen > avail:
                return Verdict.DROP_IP6_LENGTH
            dst = f[off + 24 : off + 40]
            if dst not in self._vip_addresses:
                return Verdict.PASS_NOT_VIP
            total = 40 + plen
            ext, proto, l4 = _walk_ext(f, off + 40, off + total, f[off + 6], True)
            if ext != _EXT_OK:
                return Verdict.DROP_FRAGMENT if ext == _EXT_FRAGMENT else Verdict.DROP_IP6_EXT
            tclass = ((f[off] & 0x0F) << 4) | (f[off + 1] >> 4)
        else:
            return Verdict.PASS_NOT_IP

        end = off + total
        if proto in (IPPROTO_TCP, IPPROTO_UDP):
            return self._transport(
                f, off, l4, end, proto, tclass, dst, status, now, tx, misses, events
            )
        if proto == (IPPROTO_ICMP if etype == 0x0800 else IPPROTO_ICMPV6):
            return self._icmp_error(f, off, l4, end, tclass, dst, tx, misses, now)
        return Verdict.PASS_NOT_SERVICE

    def _transport(
        self,
        f: bytes,
        off: int,
        l4: int,
        end: int,
        proto: int,
        tclass: int,
        dst: bytes,
        status: int,
        now: int,
        tx: list[tuple[int, bytes]],
        misses: list[MissT],
        events: list[tuple[int, FlowT, int]],
    ) -> int:
        seglen = end - l4
        flags = 0
        if proto == IPPROTO_TCP:
            if seglen < 20:
                return Verdict.DROP_L4_SHORT
            doff = f[l4 + 12] >> 4
            if doff < 5 or doff * 4 > seglen:
                return Verdict.DROP_L4_SHORT
            flags = f[l4 + 13]
        elif seglen < 8:
            return Verdict.DROP_L4_SHORT
        sport, dport = _PORTS.unpack_from(f, l4)
        vip_id = self._services.get((dst, dport, proto))
        if vip_id is None:
            return Verdict.PASS_NOT_SERVICE
        v4 = f[off] >> 4 == 4
        if end - off + ENCAP_OVERHEAD > self._mtu:
            return self._too_big(f, off, l4, end, v4, tx)
        if status & TP_STATUS_CSUMNOTREADY:
            f = _complete_checksum(f, l4, end, proto)

        src = f[off + 12 : off + 16] if v4 else f[off + 8 : off + 24]
        flow: FlowT = (proto, src, sport, dst, dport)
        hash64 = flow_hash64(flow)
        forced = self._forced
        if forced is not None:
            return self._forward_forced(f, off, end, v4, tclass, hash64, forced, tx)
        if proto == IPPROTO_UDP:
            flow_start = vip_id not in self._lookup_first
        else:
            flow_start = flags & (TCP_SYN | TCP_ACK) == TCP_SYN

        self._clock(now)
        slot = self._index.get(flow)
        if slot is not None and self._expires[slot] > now:
            state = self._state[slot]
            if (
                flow_start
                and proto == IPPROTO_TCP
                and (
                    state == STATE_CLOSING
                    or self._backend[slot] not in self._members.get(vip_id, frozenset())
                )
            ):
                # Port reuse: a SYN on a closing flow, or on one whose backend no longer
                # takes new flows (down, drained, removed from the VIP): a new connection.
                return self._flow_start(
                    f, off, end, v4, tclass, flow, hash64, vip_id, now, tx, events
                )
            backend_id = self._backend[slot]
            self._last_seen[slot] = now
            if state == STATE_ESTABLISHED:
                if flags & (TCP_FIN | TCP_RST):
                    self._state[slot] = STATE_CLOSING
                    self._expires[slot] = now + self._fin_linger
                    events.append((EVENT_CLOSE, flow, backend_id))
                else:
                    self._expires[slot] = now + self._idle[proto]
                    if now >= self._touch_due[slot]:
                        self._touch_due[slot] = now + self._touch_interval
                        events.append((EVENT_TOUCH, flow, backend_id))
            tx.append((backend_id, self._encap(f, off, end, v4, tclass, hash64, backend_id)))
            return Verdict.FORWARD
        if flow_start:
            return self._flow_start(f, off, end, v4, tclass, flow, hash64, vip_id, now, tx, events)
        misses.append((vip_id, flow, f, MISS_PACKET))
        return Verdict.MISS

    def _flow_start(
        self,
        f: bytes,
        off: int,
        end: int,
        v4: bool,
        tclass: int,
        flow: FlowT,
        hash64: int,
        vip_id: int,
        now: int,
        tx: list[tuple[int, bytes]],
        events: list[tuple[int, FlowT, int]],
    ) -> int:
        backend_id = self._pick(vip_id, hash64)
        if backend_id < 0:
            return Verdict.DROP_NO_BACKEND
        self._insert(flow, hash64, backend_id, now, events)
        events.append((EVENT_NEW, flow, backend_id))
        tx.append((backend_id, self._encap(f, off, end, v4, tclass, hash64, backend_id)))
        return Verdict.NEW

    def _forward_forced(
        self,
        f: bytes,
        off: int,
        end: int,
        v4: bool,
        tclass: int,
        hash64: int,
        backend_id: int,
        tx: list[tuple[int, bytes]],
    ) -> int:
        """`forward_to`: encapsulate to `backend_id` whatever the table holds, touching nothing."""
        if backend_id not in self._backends:
            return Verdict.DROP_NO_BACKEND
        self._forwarded_to += 1
        tx.append((backend_id, self._encap(f, off, end, v4, tclass, hash64, backend_id)))
        return Verdict.FORWARD

    def _encap(
        self, f: bytes, off: int, end: int, v4: bool, tclass: int, hash64: int, backend_id: int
    ) -> bytes:
        word = 0x60000000 | (tclass << 20) | ((hash64 >> 32) & 0xFFFFF)
        outer = _OUTER.pack(
            word,
            end - off,
            IPPROTO_IPIP if v4 else IPPROTO_IPV6,
            64,
            self._source,
            self._backends[backend_id],
        )
        return outer + f[off:end]

    def _too_big(
        self, f: bytes, off: int, l4: int, end: int, v4: bool, tx: list[tuple[int, bytes]]
    ) -> int:
        if self._budget <= 0:
            return Verdict.DROP_TOO_BIG
        self._budget -= 1
        # Swap the MACs; keep the VLAN tags and the ethertype byte for byte.
        l2 = f[6:12] + f[0:6] + f[12:off]
        mtu = self._mtu - ENCAP_OVERHEAD
        if v4:
            quote = f[off : min(l4 + 8, end)]
            reply = icmp4_too_big_packet(f[off + 16 : off + 20], f[off + 12 : off + 16], mtu, quote)
        else:
            quote = f[off : off + min(end - off, _ICMP6_MAX_QUOTE)]
            reply = icmp6_too_big_packet(f[off + 24 : off + 40], f[off + 8 : off + 24], mtu, quote)
        tx.append((REPLY, l2 + reply))
        return Verdict.REPLY_TOO_BIG

    def _icmp_error(
        self,
        f: bytes,
        off: int,
        l4: int,
        end: int,
        tclass: int,
        dst: bytes,
        tx: list[tuple[int, bytes]],
        misses: list[MissT],
        now: int,
    ) -> int:
        if end - l4 < 8:
            return Verdict.DROP_ICMP_SHORT
        icmp_type = f[l4]
        v4 = f[off] >> 4 == 4
        if v4:
            if icmp_type != 3:
                return Verdict.PASS_NOT_SERVICE
        elif icmp_type != 1 and icmp_type != 2:
            return Verdict.PASS_NOT_SERVICE
        q = l4 + 8
        if v4:
            if end - q < 20:
                return Verdict.DROP_ICMP_SHORT
            vihl = f[q]
            if vihl >> 4 != 4:
                return Verdict.DROP_ICMP_BAD_QUOTE
            qhlen = (vihl & 0x0F) * 4
            if qhlen < 20:
                return Verdict.DROP_ICMP_BAD_QUOTE
            if q + qhlen + 8 > end:
                return Verdict.DROP_ICMP_SHORT
            if f[q + 12 : q + 16] != dst:
                return Verdict.DROP_ICMP_BAD_QUOTE
            qproto = f[q + 9]
            client = f[q + 16 : q + 20]
            ql4 = q + qhlen
        else:
            if end - q < 40:
                return Verdict.DROP_ICMP_SHORT
            if f[q] >> 4 != 6:
                return Verdict.DROP_ICMP_BAD_QUOTE
            ext, qproto, ql4 = _walk_ext(f, q + 40, end, f[q + 6], False)
            if ext == _EXT_TOO_LONG:
                return Verdict.DROP_ICMP_BAD_QUOTE
            if ext != _EXT_OK or ql4 + 8 > end:
                return Verdict.DROP_ICMP_SHORT
            if f[q + 8 : q + 24] != dst:
                return Verdict.DROP_ICMP_BAD_QUOTE
            client = f[q + 24 : q + 40]
        if qproto not in (IPPROTO_TCP, IPPROTO_UDP):
            return Verdict.DROP_ICMP_BAD_QUOTE
        vip_port, client_port = _PORTS.unpack_from(f, ql4)
        vip_id = self._services.get((dst, vip_port, qproto))
        if vip_id is None:
            return Verdict.PASS_NOT_SERVICE
        if end - off + ENCAP_OVERHEAD > self._mtu:
            return Verdict.DROP_TOO_BIG
        flow: FlowT = (qproto, client, client_port, dst, vip_port)
        hash64 = flow_hash64(flow)
        forced = self._forced
        if forced is not None:
            return self._forward_forced(f, off, end, v4, tclass, hash64, forced, tx)
        self._clock(now)
        slot = self._index.get(flow)
        if slot is not None and self._expires[slot] > now:
            backend_id = self._backend[slot]
            tx.append((backend_id, self._encap(f, off, end, v4, tclass, hash64, backend_id)))
            return Verdict.FORWARD
        misses.append((vip_id, flow, f, MISS_ICMP))
        return Verdict.MISS
