"""PyPacketRing on a veth pair between two namespaces: receive, checksum status, VLAN, transmit."""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import time
from collections.abc import Sequence
from typing import NamedTuple

import pytest

from flowstate.errors import UsageError
from forwarder.bpf import vip_filter
from forwarder.pyio import (
    PACKET_AUXDATA,
    REPLY,
    SOL_PACKET,
    TP_STATUS_CSUMNOTREADY,
    TP_STATUS_VLAN_VALID,
    PyPacketRing,
)
from tests.netns import Netns, Topology

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

VIP4 = socket.inet_pton(socket.AF_INET, "192.0.2.10")
VIP6 = socket.inet_pton(socket.AF_INET6, "2001:db8::10")
PEER6 = "2001:db8::2"
CLIENT4 = socket.inet_pton(socket.AF_INET, "198.51.100.7")


def mac_of(ifname: str) -> bytes:
    """MAC of `ifname` in this thread's namespace (SIOCGIFHWADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = fcntl.ioctl(s.fileno(), 0x8927, struct.pack("16s16x", ifname.encode()))
    return ifreq[18:24]


class Lab(NamedTuple):
    cap: Netns  # the forwarder's namespace, veth `va`
    peer: Netns  # the other end, veth `vb`
    va_mac: bytes
    vb_mac: bytes


@pytest.fixture
def lab(netns_factory: Topology) -> Lab:
    cap, peer = netns_factory.add_netns("cap"), netns_factory.add_netns("peer")
    netns_factory.veth(cap, "va", peer, "vb", b_addrs=[f"{PEER6}/64"])
    # Until linkwatch attaches their qdisc (up to a second after `link set up`), frames sent
    # on the links are dropped.
    netns_factory.settle()
    with cap.entered():
        va_mac = mac_of("va")
    with peer.entered():
        vb_mac = mac_of("vb")
    # The peer reaches the VIP through `va` without neighbour discovery.
    vip = socket.inet_ntop(socket.AF_INET6, VIP6)
    peer.ip("neigh", "add", vip, "lladdr", va_mac.hex(":"), "dev", "vb")
    return Lab(cap, peer, va_mac, vb_mac)


class Result(NamedTuple):
    verdicts: bytes
    tx: list[tuple[int, bytes]]
    misses: list[object]
    events: list[object]


class StandInEngine:
    """Records what it is given; returns the `tx` it was told to (an I/O test needs no more)."""

    def __init__(self, tx: Sequence[tuple[int, bytes]] = ()) -> None:
        self.frames: list[bytes] = []
        self.statuses: list[int] = []
        self.tx = list(tx)

    def process(
        self, frames: Sequence[bytes], now_ms: int, statuses: Sequence[int] | None = None
    ) -> Result:
        assert statuses is not None and len(statuses) == len(frames)
        self.frames += frames
        self.statuses += statuses
        tx, self.tx = self.tx, []
        return Result(bytes(len(frames)), tx, [], [])


class LinkedEngine(StandInEngine):
    """An engine that keeps backend link info itself, as the C engine does."""

    def __init__(self, links: dict[int, tuple[int, bytes, bytes, int]], **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.links = links

    def backend_link(self, backend_id: int) -> tuple[int, bytes, bytes, int] | None:
        """(ifindex, src_mac, dst_mac, mtu), like the C engine's."""
        return self.links.get(backend_id)


def run_until(ring: PyPacketRing, engine: StandInEngine, want: int, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while len(engine.frames) < want and time.monotonic() < deadline:
        ring.run(engine, 0, 64)
        time.sleep(0.01)


def eth(dst: bytes, src: bytes, ethertype: int, payload: bytes, tags: Sequence[int] = ()) -> bytes:
    vlan = b"".join(struct.pack("!HH", tpid, 40 + i) for i, tpid in enumerate(tags))
    return dst + src + vlan + struct.pack("!H", ethertype) + payload


def ipv4(dst: bytes, marker: bytes) -> bytes:
    body = marker.ljust(20, b"\x00")
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 0, 0, 64, 253, 0, CLIENT4, dst)
    return header + body


def sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def udp6_checksum_ok(packet: bytes) -> bool:
    """Does the UDP checksum of this IPv6 packet (no extension headers) verify?"""
    (payload_len,) = struct.unpack_from("!H", packet, 4)
    pseudo = packet[8:40] + struct.pack("!IxxxB", payload_len, 17)
    return bool(sum16(pseudo + packet[40 : 40 + payload_len]) == 0xFFFF)


def peer_sender(lab: Lab) -> socket.socket:
    with lab.peer.entered():
        sender = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        sender.bind(("vb", 0))
    return sender


def test_frames_from_the_peer_arrive_whole_with_vlan_tags_restored(lab: Lab) -> None:
    sender = peer_sender(lab)
    sent = [
        eth(lab.va_mac, lab.vb_mac, 0x0800, ipv4(VIP4, b"plain")),
        eth(lab.va_mac, lab.vb_mac, 0x0800, ipv4(VIP4, b"dot1q"), tags=[0x8100]),
        eth(lab.va_mac, lab.vb_mac, 0x0800, ipv4(VIP4, b"dot1ad"), tags=[0x88A8]),
        eth(lab.va_mac, lab.vb_mac, 0x0800, ipv4(VIP4, b"qinq"), tags=[0x88A8, 0x8100]),
    ]
    with lab.cap.entered(), PyPacketRing("va", bpf=vip_filter([VIP4, VIP6])) as ring:
        engine = StandInEngine()
        for frame in sent:
            sender.send(frame)
        run_until(ring, engine, len(sent))
        sender.close()
        # The kernel moved the outer tags into metadata; the ring put them back byte for byte.
        assert engine.frames == sent
        counters = ring.counters()
        assert counters["rx_vlan_restored"] == 3
        assert counters["rx_frames"] == len(sent)
        assert counters["rx_kernel_packets"] >= len(sent)
        assert counters["rx_kernel_drops"] == 0
        # The same counters as the C PacketRing.
        assert set(counters) == {
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
        }
        assert not any(s & TP_STATUS_CSUMNOTREADY for s in engine.statuses)


def test_csum_not_ready_for_a_local_udp_datagram(lab: Lab) -> None:
    def send_udp(marker: bytes) -> None:
        with lab.peer.entered(), socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as udp:
            udp.sendto(marker, (socket.inet_ntop(socket.AF_INET6, VIP6), 5000))

    def datagrams(engine: StandInEngine) -> list[tuple[bytes, int]]:
        return [
            (f[14:], s)
            for f, s in zip(engine.frames, engine.statuses, strict=True)
            if f[12:14] == b"\x86\xdd" and f[20] == 17
        ]

    with lab.cap.entered(), PyPacketRing("va", bpf=vip_filter([VIP6])) as ring:
        # veth offers TX checksum offload by default: the datagram crosses with CHECKSUM_PARTIAL.
        engine = StandInEngine()
        send_udp(b"partial")
        run_until(ring, engine, 1)
        [(packet, status)] = datagrams(engine)
        assert packet.endswith(b"partial")
        assert status & TP_STATUS_CSUMNOTREADY
        assert not udp6_checksum_ok(packet)  # only the pseudo-header sum is in the field
        assert ring.counters()["rx_csum_not_ready"] == 1

        lab.peer.run(["ethtool", "-K", "vb", "tx", "off"])
        engine = StandInEngine()
        send_udp(b"complete")
        run_until(ring, engine, 1)
        [(packet, status)] = datagrams(engine)
        assert packet.endswith(b"complete")
        assert not status & TP_STATUS_CSUMNOTREADY
        assert udp6_checksum_ok(packet)


def capture_in_peer(lab: Lab) -> socket.socket:
    with lab.peer.entered():
        cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        cap.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
        cap.bind(("vb", 0x0003))
    cap.settimeout(1.0)
    return cap


def received(sock: socket.socket, marker: bytes) -> bytes:
    """The first frame holding `marker`, its VLAN tag put back (the peer's chatter is skipped)."""
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        frame, ancdata, _flags, _addr = sock.recvmsg(65535, socket.CMSG_SPACE(20))
        if marker not in frame:
            continue
        for _level, _kind, aux in ancdata:
            status, _len, _snap, _mac, _net, tci, tpid = struct.unpack("=IIIHHHH", aux[:20])
            if status & TP_STATUS_VLAN_VALID:
                frame = frame[:12] + struct.pack("!HH", tpid, tci) + frame[12:]
        return frame
    raise AssertionError(f"{marker!r} never arrived")


def test_tx_frames_arrive_with_the_right_ethernet_header(lab: Lab) -> None:
    inner = ipv4(VIP4, b"to-backend")
    outer = struct.pack("!IHBB16s16s", 0x60012345, len(inner), 4, 64, bytes(16), VIP6) + inner
    reply = eth(lab.vb_mac, lab.va_mac, 0x0800, ipv4(CLIENT4, b"icmp-reply"), tags=[0x8100])
    capture = capture_in_peer(lab)
    with lab.cap.entered(), PyPacketRing("va") as ring:
        va = socket.if_nametoindex("va")
        ring.set_link(7, va, lab.va_mac, lab.vb_mac)
        engine = StandInEngine(tx=[(7, outer), (REPLY, reply), (8, outer)])
        result = ring.run(engine, 0, 16)
        assert result.tx == []
        assert ring.counters()["tx_frames"] == 2
        assert ring.counters()["tx_no_route"] == 1  # backend 8 has no link

        assert received(capture, b"to-backend") == lab.vb_mac + lab.va_mac + b"\x86\xdd" + outer
        assert received(capture, b"icmp-reply") == reply

        # The ring never reads back what it sent, although no filter is attached.
        time.sleep(0.1)
        frames, _statuses = ring.receive(64)
        assert not [f for f in frames if b"to-backend" in f or b"icmp-reply" in f]
        assert ring.ignores_outgoing
        assert ring.counters()["rx_outgoing"] == 0

        # An engine that keeps link info is asked first; `send` reuses the last engine.
        linked = LinkedEngine({8: (va, lab.va_mac, lab.vb_mac, 1500)})
        ring.run(linked, 0, 16)
        assert ring.send([(8, outer.replace(b"to-backend", b"via-engine"))]) == 1
        assert received(capture, b"via-engine")[:14] == lab.vb_mac + lab.va_mac + b"\x86\xdd"
        assert ring.send([(7, outer)]) == 0  # the engine knows no backend 7
        assert ring.counters()["tx_no_route"] == 2

        # A packet longer than the link's MTU is not sent.
        ring.set_link(9, va, lab.va_mac, lab.vb_mac, mtu=len(outer) - 1)
        assert ring.send([(9, outer)], StandInEngine()) == 0
        assert ring.counters()["tx_too_big"] == 1
        assert ring.counters()["tx_bytes"] == 2 * (14 + len(outer)) + len(reply)
    capture.close()


def test_fanout_group_members_share_the_traffic(lab: Lab) -> None:
    sender = peer_sender(lab)
    with lab.cap.entered():
        program = vip_filter([VIP4])
        first = PyPacketRing("va", fanout_group=4242, bpf=program)
        second = PyPacketRing("va", fanout_group=4242, bpf=program)
    engines = (StandInEngine(), StandInEngine())
    try:
        for i in range(20):
            sender.send(eth(lab.va_mac, lab.vb_mac, 0x0800, ipv4(VIP4, b"fan%02d" % i)))
        deadline = time.monotonic() + 2.0
        while sum(len(e.frames) for e in engines) < 20 and time.monotonic() < deadline:
            first.run(engines[0], 0, 64)
            second.run(engines[1], 0, 64)
            time.sleep(0.01)
        # One flow: every frame goes to exactly one member, and all to the same one.
        counts = sorted(len(e.frames) for e in engines)
        assert counts == [0, 20]
    finally:
        first.close()
        second.close()
        sender.close()


def test_bad_arguments(lab: Lab) -> None:
    with lab.cap.entered():
        with pytest.raises(UsageError):
            PyPacketRing("va", fanout_group=70000)
        with PyPacketRing("va", bpf=vip_filter([VIP4])) as quiet:
            started = time.monotonic()
            assert quiet.run(StandInEngine(), 0, 8, timeout_ms=50).verdicts == b""
            assert time.monotonic() - started >= 0.04
        assert quiet.closed
        with pytest.raises(OSError):
            PyPacketRing("no-such-if0")
        with PyPacketRing("va") as ring, pytest.raises(UsageError):
            ring.set_link(1, 0, b"", b"")
    ring.close()  # twice is fine
