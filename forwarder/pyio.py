"""Pure-Python packet I/O with the interface of the C `PacketRing`: AF_PACKET in, engine, out.

It is the reference path (and the fallback where the extension is not built): plain `recvmsg` per
frame instead of a TPACKET_V2 ring, plain `send` per frame instead of `sendmmsg`, same semantics.

What the C ring mirrors (see DATAPATH.md, "I/O"):

* Receive socket: AF_PACKET/SOCK_RAW created with protocol 0 (it queues nothing yet), then
  PACKET_AUXDATA, PACKET_IGNORE_OUTGOING (Linux >= 4.20; without it outgoing frames are dropped
  by their `sll_pkttype`), the receive buffer and the BPF filter, and only then `bind` to
  (ifindex, ETH_P_ALL): no frame is queued before the filter is in place. PACKET_FANOUT
  (hash | defrag) after the bind, since the kernel only lets a bound socket join a group.
* Checksums: `tpacket_auxdata.tp_status & TP_STATUS_CSUMNOTREADY` (skb->ip_summed ==
  CHECKSUM_PARTIAL) is passed to `engine.process` in `statuses`; the engine completes the sum.
* VLAN: the kernel strips the outer tag into metadata before packet sockets see the frame. When
  `TP_STATUS_VLAN_VALID` is set, the tag (TPID from `tp_vlan_tpid` if `TP_STATUS_VLAN_TPID_VALID`,
  else 0x8100, and `tp_vlan_tci`) is put back after the MAC addresses, as libpcap does, so the
  engine sees the frame as it was on the wire and a REPLY leaves on the client's VLAN.
* Transmit: one AF_PACKET socket per egress interface, bound with protocol 0 (so it never
  receives), `send` with MSG_DONTWAIT (a full queue is a counted TX error, never a blocked loop).
"""

from __future__ import annotations

import errno
import select
import socket
import struct
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any, Protocol, TypeVar

from flowstate.errors import UsageError
from forwarder.bpf import attach_filter

__all__ = ["REPLY", "Engine", "PyPacketRing"]

#: The `tx` "backend id" of a frame to send back out of the receive interface (DATAPATH.md).
REPLY = -1

# linux/if_packet.h, linux/if_ether.h
SOL_PACKET = 263
PACKET_AUXDATA = 8
PACKET_STATISTICS = 6
PACKET_FANOUT = 18
PACKET_IGNORE_OUTGOING = 23
PACKET_FANOUT_HASH = 0
PACKET_FANOUT_FLAG_DEFRAG = 0x8000
PACKET_OUTGOING = 4
TP_STATUS_CSUMNOTREADY = 0x08
TP_STATUS_VLAN_VALID = 0x10
TP_STATUS_VLAN_TPID_VALID = 0x40
ETH_P_ALL = 0x0003
SO_RCVBUFFORCE = 33  # asm-generic/socket.h; not exported by Python's socket module
ETH_P_8021Q = 0x8100
_ETH_P_IPV6 = b"\x86\xdd"

# struct tpacket_auxdata {u32 tp_status, tp_len, tp_snaplen; u16 tp_mac, tp_net, tp_vlan_tci,
# tp_vlan_tpid;}
_AUXDATA = struct.Struct("=IIIHHHH")
_ANC_SIZE = socket.CMSG_SPACE(_AUXDATA.size)
_TPACKET_STATS = struct.Struct("=II")  # struct tpacket_stats {u32 tp_packets, tp_drops;}
#: Largest frame taken whole; a longer one (GRO left on, see `neigh.disable_offloads`) is counted
#: in `rx_truncated` and dropped.
MAX_FRAME = 65536


class _HasTx(Protocol):
    @property
    def tx(self) -> list[tuple[int, bytes]]: ...


_R_co = TypeVar("_R_co", bound=_HasTx, covariant=True)
_R = TypeVar("_R", bound=_HasTx)


class Engine(Protocol[_R_co]):
    """What the ring needs of an engine (`forwarder.fastpath.Engine` has it)."""

    def process(
        self, frames: Sequence[bytes], now_ms: int, statuses: Sequence[int] | None = None
    ) -> _R_co: ...


_Link = tuple[int, bytes, bytes, int]  # ifindex, src_mac, dst_mac, mtu (0: none)


class PyPacketRing:
    """Receive frames of one interface, run them through an engine, send what it returns.

    Egress link info of a backend comes from `engine.backend_link(backend_id)` when the engine
    offers it (as the C engine does: `None` or `(ifindex, src_mac, dst_mac, mtu)`; an object
    with those attributes also works), else from this ring's own map kept by `set_link` and
    `clear_link`. A backend with neither is counted in `tx_no_route` (DROP_NO_ROUTE), a packet
    longer than the link's MTU in `tx_too_big`.
    """

    def __init__(
        self,
        ifname: str,
        *,
        fanout_group: int = 0,
        block_size: int = 1 << 20,
        block_count: int = 64,
        frame_size: int = 2048,
        bpf: bytes = b"",
        block_timeout_ms: int = 1,
    ) -> None:
        # The C ring's slot size and (ignored there too) block retire timeout; here every frame
        # gets a MAX_FRAME buffer and is readable as soon as it is queued.
        del frame_size, block_timeout_ms
        if not 0 <= fanout_group <= 0xFFFF:
            raise UsageError(f"fanout_group must be 0..65535, got {fanout_group}")
        if block_size <= 0 or block_count <= 0:
            raise UsageError("block_size and block_count must be positive")
        self.ifname = ifname
        self.ifindex = socket.if_nametoindex(ifname)
        self.ignores_outgoing = False
        self._links: dict[int, _Link] = {}
        self._tx: dict[int, socket.socket] = {}
        self._engine: Any = None
        self._buf = bytearray(MAX_FRAME)
        self._view = memoryview(self._buf)
        self._pending_error: OSError | None = None
        # The C ring's counter names.
        self._counters = dict.fromkeys(
            (
                "rx_frames",
                "rx_reads",
                "rx_truncated",
                "rx_outgoing",
                "rx_csum_not_ready",
                "rx_vlan_restored",
                "rx_kernel_packets",
                "rx_kernel_drops",
                "tx_frames",
                "tx_bytes",
                "tx_errors",
                "tx_no_route",
                "tx_too_big",
            ),
            0,
        )
        self._rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        try:
            self._setup_rx(fanout_group, block_size * block_count, bpf)
            # Sockets belong to the network namespace of the thread creating them: make the
            # REPLY one now (other egress interfaces get theirs on first use).
            self._tx_socket(self.ifindex)
        except BaseException:
            self.close()
            raise

    def _setup_rx(self, fanout_group: int, rcvbuf: int, bpf: bytes) -> None:
        rx = self._rx
        rx.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
        try:
            rx.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            self.ignores_outgoing = True
        except OSError as exc:
            if exc.errno != errno.ENOPROTOOPT:
                raise
        try:
            rx.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except PermissionError:
            rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if bpf:
            attach_filter(rx, bpf)
        rx.bind((self.ifname, ETH_P_ALL))
        if fanout_group:
            mode = PACKET_FANOUT_HASH | PACKET_FANOUT_FLAG_DEFRAG
            rx.setsockopt(SOL_PACKET, PACKET_FANOUT, struct.pack("=I", fanout_group | mode << 16))
        rx.setblocking(False)

    # ---- link info --------------------------------------------------------------------------

    def set_link(
        self, backend_id: int, ifindex: int, src_mac: bytes, dst_mac: bytes, mtu: int = 0
    ) -> None:
        """Egress of `backend_id` for engines without `backend_link` (mtu 0: no limit)."""
        if len(src_mac) != 6 or len(dst_mac) != 6 or ifindex <= 0 or mtu < 0:
            raise UsageError("link needs ifindex > 0, 6-byte MACs and mtu >= 0")
        self._links[backend_id] = (ifindex, bytes(src_mac), bytes(dst_mac), mtu)

    def clear_link(self, backend_id: int) -> None:
        self._links.pop(backend_id, None)

    def _link(self, engine: Any, backend_id: int) -> _Link | None:
        lookup = getattr(engine, "backend_link", None)
        if lookup is None:
            return self._links.get(backend_id)
        got = lookup(backend_id)
        if got is None:
            return None
        if hasattr(got, "dst_mac"):
            link: _Link = (got.ifindex, got.src_mac, got.dst_mac, got.mtu)
        else:
            link = (got[0], got[1], got[2], got[3] if len(got) > 3 else 0)
        return link if link[0] > 0 and len(link[1]) == 6 and len(link[2]) == 6 else None

    # ---- receive, process, send -------------------------------------------------------------

    def fileno(self) -> int:
        return self._rx.fileno()

    def receive(self, max_frames: int) -> tuple[list[bytes], list[int]]:
        """Up to `max_frames` frames queued now, and their `tp_status` words; never blocks."""
        if self._pending_error is not None:
            exc, self._pending_error = self._pending_error, None
            raise exc
        frames: list[bytes] = []
        statuses: list[int] = []
        counters = self._counters
        took = 0
        while len(frames) < max_frames:
            try:
                size, ancdata, flags, address = self._rx.recvmsg_into(
                    [self._buf], _ANC_SIZE, socket.MSG_DONTWAIT
                )
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                # ENETDOWN and friends are reported once: keep what was read, raise next time.
                if not frames:
                    raise
                self._pending_error = exc
                break
            took = 1
            if address[2] == PACKET_OUTGOING:
                counters["rx_outgoing"] += 1
                continue
            if flags & socket.MSG_TRUNC:
                counters["rx_truncated"] += 1
                continue
            status = 0
            frame = bytes(self._view[:size])
            for level, kind, data in ancdata:
                if level == SOL_PACKET and kind == PACKET_AUXDATA and len(data) >= _AUXDATA.size:
                    status, _len, _snap, _mac, _net, tci, tpid = _AUXDATA.unpack_from(data)
                    if status & TP_STATUS_VLAN_VALID:
                        if not status & TP_STATUS_VLAN_TPID_VALID:
                            tpid = ETH_P_8021Q
                        frame = frame[:12] + struct.pack("!HH", tpid, tci) + frame[12:]
                        counters["rx_vlan_restored"] += 1
            if status & TP_STATUS_CSUMNOTREADY:
                counters["rx_csum_not_ready"] += 1
            frames.append(frame)
            statuses.append(status)
        counters["rx_frames"] += len(frames)
        counters["rx_reads"] += took
        return frames, statuses

    def run(self, engine: Engine[_R], now_ms: int, max_frames: int, timeout_ms: int = 0) -> _R:
        """Receive up to `max_frames` frames, process them in one batch, send the output.

        With `timeout_ms` > 0, first waits that long at most for a frame (0: never waits).
        Returns the engine's result with `tx` emptied (its items have been sent).
        """
        if timeout_ms > 0:
            select.select([self._rx], [], [], timeout_ms / 1000)
        frames, statuses = self.receive(max_frames)
        result = engine.process(frames, now_ms, statuses)
        self._engine = engine
        self.send(result.tx, engine)
        result.tx.clear()
        return result

    def send(self, tx: Iterable[tuple[int, bytes]], engine: Any = None) -> int:
        """Transmit `tx` items of `engine.process`; returns how many frames left.

        Backend link info is looked up in `engine`, by default the one of the last `run`.
        """
        engine = engine if engine is not None else self._engine
        counters = self._counters
        sent = 0
        for backend_id, packet in tx:
            if backend_id == REPLY:
                ifindex, frame = self.ifindex, packet
            else:
                link = self._link(engine, backend_id)
                if link is None:
                    counters["tx_no_route"] += 1
                    continue
                ifindex, src_mac, dst_mac, mtu = link
                if mtu and len(packet) > mtu:
                    counters["tx_too_big"] += 1
                    continue
                frame = b"".join((dst_mac, src_mac, _ETH_P_IPV6, packet))
            try:
                self._tx_socket(ifindex).send(frame, socket.MSG_DONTWAIT)
            except OSError as exc:
                counters["tx_errors"] += 1
                if exc.errno in (errno.ENXIO, errno.ENODEV):
                    self._drop_tx_socket(ifindex)
                continue
            sent += 1
            counters["tx_bytes"] += len(frame)
        counters["tx_frames"] += sent
        return sent

    def _tx_socket(self, ifindex: int) -> socket.socket:
        sock = self._tx.get(ifindex)
        if sock is None:
            ifname = socket.if_indextoname(ifindex)
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            try:
                # Protocol 0: bound for sending only; the socket never queues a received frame.
                sock.bind((ifname, 0))
            except BaseException:
                sock.close()
                raise
            self._tx[ifindex] = sock
        return sock

    def _drop_tx_socket(self, ifindex: int) -> None:
        sock = self._tx.pop(ifindex, None)
        if sock is not None:
            sock.close()

    # ---- state ------------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """The C ring's rx_*/tx_* counters; rx_kernel_* from PACKET_STATISTICS (socket drops)."""
        if not self.closed:
            packets, drops = _TPACKET_STATS.unpack(
                self._rx.getsockopt(SOL_PACKET, PACKET_STATISTICS, _TPACKET_STATS.size)
            )
            # The kernel resets its statistics on every read: accumulate.
            self._counters["rx_kernel_packets"] += packets
            self._counters["rx_kernel_drops"] += drops
        return dict(self._counters)

    @property
    def closed(self) -> bool:
        return self._rx.fileno() < 0

    def close(self) -> None:
        """Close every socket; safe to call twice."""
        self._rx.close()
        for ifindex in list(self._tx):
            self._drop_tx_socket(ifindex)
        self._engine = None

    def __enter__(self) -> PyPacketRing:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PyPacketRing({self.ifname!r}, ifindex={self.ifindex})"
