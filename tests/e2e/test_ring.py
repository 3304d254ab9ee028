"""The C PacketRing on real veth pairs: client --vc|fa-- forwarder --fb|vb-- backend.

Frames injected on `vc` reach the ring on `fa`; the ring runs them through the C engine and
transmits the encapsulated packets out of `fb` (seen on `vb`), REPLY frames back out of `fa`
(seen on `vc`). Expected bytes come from the Python reference engine fed the same frames.
"""

from __future__ import annotations

import fcntl
import select
import socket
import struct
import time
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from forwarder.bpf import vip_filter
from forwarder.fastpath import Verdict, c_engine_available, load_engine
from forwarder.packet import (
    ETH_P_IPV6,
    IPPROTO_UDP,
    TCP_ACK,
    TCP_SYN,
    TP_STATUS_CSUMNOTREADY,
    checksum,
    frame,
    ipv4,
    ipv6,
    pseudo_header_sum,
    tcp,
)
from tests.netns import Netns, Topology

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not c_engine_available(), reason="forwarder._fastpath is not built"),
]

ETH_P_ALL = 0x0003
SOURCE = socket.inet_pton(socket.AF_INET6, "fd00:f::1")
BACKEND = socket.inet_pton(socket.AF_INET6, "fd00:b::1")
VIP4 = socket.inet_aton("192.0.2.10")
VIP6 = socket.inet_pton(socket.AF_INET6, "2001:db8::10")
CLIENT4 = socket.inet_aton("198.51.100.7")
CLIENT6 = socket.inet_pton(socket.AF_INET6, "2001:db8:c::7")
OTHER4 = socket.inet_aton("203.0.113.1")
BID = 1
NOW = 1_000_000


def mac_of(ns: Netns, ifname: str) -> bytes:
    """MAC of `ifname` in `ns` (SIOCGIFHWADDR)."""
    with ns.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = fcntl.ioctl(s.fileno(), 0x8927, struct.pack("16s16x", ifname.encode()))
    return ifreq[18:24]


def raw_socket(ns: Netns, ifname: str) -> socket.socket:
    """AF_PACKET socket in `ns` that sends on / captures from `ifname`."""
    sock = ns.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((ifname, ETH_P_ALL))
    sock.setblocking(False)
    return sock


@dataclass
class Lab:
    client: Netns
    fwd: Netns
    backend: Netns
    fa_mac: bytes
    fb_mac: bytes
    vb_mac: bytes
    vc_mac: bytes
    fb_index: int
    inject: socket.socket
    capture: socket.socket  # on vb: what the forwarder sent to the backend
    returned: socket.socket  # on vc: what the forwarder sent back to the client

    def engine(self, impl: str = "c", *, link: bool = True, **kw: Any) -> Any:
        engine = load_engine(impl)(
            source_ipv6=SOURCE,
            capacity=4096,
            tcp_idle_ms=60_000,
            udp_idle_ms=30_000,
            fin_linger_ms=1_000,
            touch_interval_ms=10_000,
            **kw,
        )
        for vip_id, (vip, port, proto) in enumerate(
            ((VIP4, 80, 6), (VIP4, 53, 17), (VIP6, 443, 6))
        ):
            engine.set_vip(vip_id, vip, port, proto)
            engine.set_maglev(vip_id, array("H", [BID] * 7).tobytes())
        links: dict[str, Any] = {
            "dst_mac": self.vb_mac,
            "src_mac": self.fb_mac,
            "ifindex": self.fb_index,
        }
        engine.set_backend(BID, BACKEND, **(links if link else {}))
        return engine

    def ring(self, **kw: Any) -> Any:
        from forwarder._fastpath import PacketRing

        with self.fwd.entered():
            return PacketRing("fa", **{"block_size": 1 << 16, "block_count": 16, **kw})

    def to_forwarder(self, packet_frames: Sequence[bytes]) -> None:
        for f in packet_frames:
            self.inject.send(f)


@pytest.fixture
def lab(netns_factory: Topology) -> Iterator[Lab]:
    client = netns_factory.add_netns("client")
    fwd = netns_factory.add_netns("fwd")
    backend = netns_factory.add_netns("backend")
    netns_factory.veth(client, "vc", fwd, "fa")
    netns_factory.veth(fwd, "fb", backend, "vb")
    for ns in (client, fwd, backend):
        # Quiet links: no router solicitations or MLD reports among the frames under test.
        ns.set_sysctl("net.ipv6.conf.all.disable_ipv6", 1)
        ns.set_sysctl("net.ipv6.conf.default.disable_ipv6", 1)
    fwd.disable_offloads("fa", ("gro",))
    netns_factory.settle()
    lab = Lab(
        client=client,
        fwd=fwd,
        backend=backend,
        fa_mac=mac_of(fwd, "fa"),
        fb_mac=mac_of(fwd, "fb"),
        vb_mac=mac_of(backend, "vb"),
        vc_mac=mac_of(client, "vc"),
        fb_index=fwd.ifindex("fb"),
        inject=raw_socket(client, "vc"),
        capture=raw_socket(backend, "vb"),
        returned=raw_socket(client, "vc"),
    )
    try:
        yield lab
    finally:
        for sock in (lab.inject, lab.capture, lab.returned):
            sock.close()


def to_fa(lab: Lab, packet: bytes, **kw: Any) -> bytes:
    return frame(packet, dst=lab.fa_mac, src=lab.vc_mac, **kw)


def syn4(lab: Lab, port: int, *, dst: bytes = VIP4, flags: int = TCP_SYN, size: int = 0) -> bytes:
    segment = tcp(CLIENT4, dst, port, 80, flags=flags, payload=bytes(size))
    return to_fa(lab, ipv4(CLIENT4, dst, segment, proto=6))


def syn6(lab: Lab, port: int, flags: int = TCP_SYN) -> bytes:
    segment = tcp(CLIENT6, VIP6, port, 443, flags=flags)
    return to_fa(lab, ipv6(CLIENT6, VIP6, segment, nh=6))


def run_until(ring: Any, engine: Any, count: int, timeout: float = 5.0) -> bytes:
    """Run the ring until `count` frames were handled; all verdicts, in order."""
    verdicts = b""
    deadline = time.monotonic() + timeout
    while len(verdicts) < count and time.monotonic() < deadline:
        verdicts += ring.run(engine, NOW, 256, timeout_ms=50).verdicts
    return verdicts


def drain(sock: socket.socket, count: int, timeout: float = 3.0) -> list[bytes]:
    """Frames captured on `sock` that carry our tunnel or our ICMP answers, up to `count`."""
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([sock], [], [], left)[0]:
            break
        data, addr = sock.recvfrom(65536)
        if addr[2] != socket.PACKET_OUTGOING:
            got.append(data)
    return got


def expected_frames(lab: Lab, packet_frames: Sequence[bytes], **kw: Any) -> list[bytes]:
    """What the Python reference makes of the frames, as Ethernet frames on the backend link."""
    reference = lab.engine("python", **kw)
    result = reference.process(list(packet_frames), NOW)
    ether = lab.vb_mac + lab.fb_mac + struct.pack("!H", ETH_P_IPV6)
    return [ether + packet for backend_id, packet in result.tx if backend_id == BID]


def test_forwards_encapsulated_frames(lab: Lab) -> None:
    engine = lab.engine()
    frames = [syn4(lab, 1000 + i) for i in range(20)] + [syn6(lab, 2000 + i) for i in range(20)]
    frames += [syn4(lab, 1000 + i, flags=TCP_ACK) for i in range(20)]
    with lab.ring() as ring:
        lab.to_forwarder(frames)
        verdicts = run_until(ring, engine, len(frames))
        counters = ring.counters()
    assert verdicts == bytes([Verdict.NEW] * 40 + [Verdict.FORWARD] * 20)
    got = drain(lab.capture, len(frames))
    assert got == expected_frames(lab, frames)
    assert counters["tx_frames"] == len(frames) and counters["tx_errors"] == 0
    assert engine.counters()["tx_packets"] == len(frames)


def test_completes_partial_checksums_of_local_senders(lab: Lab) -> None:
    """A UDP socket on the client side sends with CHECKSUM_PARTIAL (veth offload): the ring
    sees TP_STATUS_CSUMNOTREADY and the backend gets a valid checksum."""
    lab.client.set_sysctl("net.ipv4.conf.all.rp_filter", 0)
    lab.client.add_address("vc", "198.51.100.7/24")
    lab.client.ip("route", "add", "192.0.2.10/32", "dev", "vc")
    lab.client.ip("neigh", "add", "192.0.2.10", "lladdr", lab.fa_mac.hex(":"), "dev", "vc")
    engine = lab.engine()
    with lab.ring() as ring, lab.client.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        for i in range(5):
            sender.sendto(b"query %d" % i + bytes(i), ("192.0.2.10", 53))
        verdicts = run_until(ring, engine, 5)
        counters = ring.counters()
    assert verdicts == bytes([Verdict.NEW] + [Verdict.FORWARD] * 4)
    assert counters["rx_csum_not_ready"] == 5
    for out in drain(lab.capture, 5):
        inner = out[14 + 40 :]
        assert inner[9] == IPPROTO_UDP
        segment = inner[20:]
        pseudo = pseudo_header_sum(inner[12:16], inner[16:20], IPPROTO_UDP, len(segment))
        assert checksum(segment, pseudo) == 0, "the backend would drop this datagram"


def test_fanout_group_spreads_flows_over_two_rings(lab: Lab) -> None:
    engine = lab.engine()
    frames = [syn4(lab, 10_000 + i) for i in range(200)]
    with lab.ring(fanout_group=4242) as one, lab.ring(fanout_group=4242) as two:
        lab.to_forwarder(frames)
        seen: dict[int, set[int]] = {0: set(), 1: set()}
        deadline = time.monotonic() + 5
        while sum(map(len, seen.values())) < len(frames) and time.monotonic() < deadline:
            for index, ring in enumerate((one, two)):
                for code, flow, _backend in ring.run(engine, NOW, 256, timeout_ms=10).events:
                    assert code == 1
                    seen[index].add(flow[2])
    assert len(seen[0]) + len(seen[1]) == len(frames)
    assert seen[0] and seen[1], "PACKET_FANOUT_HASH put every flow on one ring"
    assert not seen[0] & seen[1]
    assert len(drain(lab.capture, len(frames))) == len(frames)


def test_bpf_filter_admits_only_vip_traffic(lab: Lab) -> None:
    engine = lab.engine()
    vip_frames = [syn4(lab, 3000 + i) for i in range(10)] + [syn6(lab, 4000)]
    other = [syn4(lab, 5000 + i, dst=OTHER4) for i in range(10)]
    other.append(lab.fa_mac + lab.vc_mac + b"\x08\x06" + bytes(46))  # not IP at all
    with lab.ring(bpf=vip_filter([VIP4, VIP6])) as ring:
        lab.to_forwarder([f for pair in zip(other, vip_frames, strict=False) for f in pair])
        lab.to_forwarder(other[len(vip_frames) :])
        verdicts = run_until(ring, engine, len(vip_frames), timeout=2)
        verdicts += ring.run(engine, NOW, 256, timeout_ms=100).verdicts
    assert verdicts == bytes([Verdict.NEW] * len(vip_frames))


def test_too_big_answer_leaves_by_the_receive_interface(lab: Lab) -> None:
    engine = lab.engine(tunnel_mtu=1280)
    big = syn4(lab, 6000, flags=TCP_ACK, size=1300)
    with lab.ring() as ring:
        lab.to_forwarder([big])
        assert run_until(ring, engine, 1) == bytes([Verdict.REPLY_TOO_BIG])
    reference = lab.engine("python", tunnel_mtu=1280).process([big], NOW)
    ((dest, answer),) = reference.tx
    assert dest == -1
    got = [f for f in drain(lab.returned, 1) if f[:6] == lab.vc_mac]
    assert got == [answer]
    assert not drain(lab.capture, 1, timeout=0.3)


def test_backend_link_mtu_applies_the_too_big_rule(lab: Lab) -> None:
    engine = lab.engine()
    engine.set_backend(
        BID, BACKEND, dst_mac=lab.vb_mac, src_mac=lab.fb_mac, ifindex=lab.fb_index, mtu=1300
    )
    big = syn4(lab, 6100, size=1300)
    with lab.ring() as ring:
        lab.to_forwarder([big])
        assert run_until(ring, engine, 1) == bytes([Verdict.REPLY_TOO_BIG])
    (answer,) = [f for f in drain(lab.returned, 1) if f[:6] == lab.vc_mac]
    assert answer[14 + 20] == 3 and answer[14 + 21] == 4  # ICMP fragmentation needed
    assert struct.unpack_from("!H", answer, 14 + 20 + 6)[0] == 1300 - 40


def test_backend_without_link_info_is_no_route(lab: Lab) -> None:
    engine = lab.engine(link=False)
    with lab.ring() as ring:
        lab.to_forwarder([syn4(lab, 7000)])
        assert run_until(ring, engine, 1) == bytes([Verdict.DROP_NO_ROUTE])
        assert ring.counters()["tx_no_route"] == 1
    assert engine.counters()["drop_no_route"] == 1
    assert len(engine) == 1  # the flow is pinned all the same; the next packet may have a route
    assert not drain(lab.capture, 1, timeout=0.3)


def test_send_transmits_process_output(lab: Lab) -> None:
    engine = lab.engine(tunnel_mtu=1280)
    frames = [syn4(lab, 8000), syn4(lab, 8001, flags=TCP_ACK, size=1300)]
    result = engine.process(frames, NOW)
    assert [b for b, _ in result.tx] == [BID, -1]
    with lab.ring() as ring:
        # No engine given and no run() yet to remember one: only the REPLY has a way out.
        assert ring.send(result.tx[:1]) == 0
        assert ring.counters()["tx_no_route"] == 1
        assert ring.send(result.tx, engine) == 2
        assert ring.send([], engine) == 0
    assert drain(lab.capture, 1) == expected_frames(lab, frames[:1])
    assert [f for f in drain(lab.returned, 1) if f[:6] == lab.vc_mac] == [result.tx[1][1]]


def test_vlan_tag_stripped_by_the_kernel_is_restored(lab: Lab) -> None:
    engine = lab.engine()
    tagged = syn4(lab, 9000)
    tagged = tagged[:12] + struct.pack("!HH", 0x8100, 5) + tagged[12:]
    with lab.ring() as ring:
        lab.to_forwarder([tagged])
        assert run_until(ring, engine, 1) == bytes([Verdict.NEW])
        assert ring.counters()["rx_vlan_restored"] == 1
    assert drain(lab.capture, 1) == expected_frames(lab, [tagged])


def test_ring_is_a_context_manager_with_a_pollable_fd(lab: Lab) -> None:
    engine = lab.engine()
    ring = lab.ring()
    with ring:
        assert ring.fileno() >= 0
        assert not select.select([ring], [], [], 0)[0]
        lab.to_forwarder([syn4(lab, 9100)])
        assert select.select([ring], [], [], 2)[0]
        assert run_until(ring, engine, 1) == bytes([Verdict.NEW])
    assert ring.closed
    with pytest.raises(ValueError):
        ring.fileno()
    with pytest.raises(ValueError):
        ring.run(engine, NOW, 1)
    ring.close()  # twice is fine
    assert TP_STATUS_CSUMNOTREADY == 8


def wait_for_drops(ring: Any, count: int, timeout: float = 5.0) -> dict[str, int]:
    """Counters once the kernel has dropped `count` frames for want of a free slot
    (PACKET_STATISTICS), without reading any."""
    deadline = time.monotonic() + timeout
    while True:
        counters: dict[str, int] = ring.counters()
        if counters["rx_kernel_drops"] >= count or time.monotonic() > deadline:
            return counters
        time.sleep(0.01)


def test_each_frame_is_handed_over_on_its_own(lab: Lab) -> None:
    """TPACKET_V2: a lone frame is readable at once. A V3 ring would hold it in its block until
    the block filled (32 frames here) or its retire timer (the 60 s asked for) fired."""
    engine = lab.engine()
    with lab.ring(block_timeout_ms=60_000) as ring:
        for i in range(3):
            lab.to_forwarder([syn4(lab, 9200 + i)])
            assert select.select([ring], [], [], 5)[0], "the frame was not handed over"
            assert ring.run(engine, NOW, 256).verdicts == bytes([Verdict.NEW])
            assert not select.select([ring], [], [], 0)[0], "its slot was not given back"
        counters = ring.counters()
    assert counters["rx_frames"] == 3 and counters["rx_reads"] == 3


def test_full_ring_drops_in_the_kernel_and_wraps(lab: Lab) -> None:
    """A 4-slot ring: frames beyond 4 unread ones are the kernel's drops; one run() takes at
    most one lap; slots go back in order, so the ring keeps going round."""
    engine = lab.engine()
    frames = [syn4(lab, 9300 + i) for i in range(10)]
    with lab.ring(block_size=4096, block_count=2) as ring:  # 2 slots of 2048 per block
        lab.to_forwarder(frames)
        assert wait_for_drops(ring, 6)["rx_kernel_drops"] == 6
        assert ring.run(engine, NOW, 256).verdicts == bytes([Verdict.NEW] * 4)
        assert ring.run(engine, NOW, 256).verdicts == b""
        # Round and round: waves of 3 frames start at every slot in turn.
        later = [syn4(lab, 9400 + i) for i in range(15)]
        verdicts = b""
        for wave in range(5):
            lab.to_forwarder(later[3 * wave : 3 * wave + 3])
            verdicts += run_until(ring, engine, 3)
        counters = ring.counters()
    assert verdicts == bytes([Verdict.NEW] * 15)
    assert counters["rx_kernel_drops"] == 6 and counters["rx_frames"] == 4 + 15
    got = drain(lab.capture, 4 + 15)
    assert got == expected_frames(lab, frames[:4] + later)


def test_truncated_frames_are_counted_not_processed(lab: Lab) -> None:
    engine = lab.engine()
    # A 256-byte slot holds 150 bytes of an untagged frame (DATAPATH.md, I/O clarification 15).
    sizes = {9500: 96, 9501: 97, 9502: 0}  # TCP payload: frames of 150, 151 and 54 bytes
    with lab.ring(frame_size=256, block_size=4096, block_count=2) as ring:
        lab.to_forwarder([syn4(lab, port, size=size) for port, size in sizes.items()])
        verdicts = run_until(ring, engine, 2)
        verdicts += ring.run(engine, NOW, 256, timeout_ms=100).verdicts
        counters = ring.counters()
    assert verdicts == bytes([Verdict.NEW] * 2)
    assert counters["rx_truncated"] == 1 and counters["rx_frames"] == 2
    # Both frames that fit were tunnelled whole (their outer header written in the headroom).
    got = drain(lab.capture, 2)
    assert [len(f) for f in got] == [14 + 40 + 150 - 14, 14 + 40 + 54 - 14]
    assert got == expected_frames(lab, [syn4(lab, 9500, size=96), syn4(lab, 9502)])
    # A slot must hold its header, a sockaddr_ll and the headroom (the kernel's own minimum).
    with pytest.raises(ValueError, match="at least 92"):
        lab.ring(frame_size=80, block_size=5 * 4096, block_count=1)  # 256 slots of 80
