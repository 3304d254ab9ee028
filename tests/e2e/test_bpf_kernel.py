"""The VIP filter in the kernel: an AF_PACKET socket on a veth gets VIP frames only."""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest

from forwarder.bpf import attach_filter, detach_filter, vip_filter
from tests.netns import Netns, Topology

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

ETH_P_ALL = 0x0003
VIP4 = socket.inet_pton(socket.AF_INET, "192.0.2.10")
OTHER4 = socket.inet_pton(socket.AF_INET, "192.0.2.11")
VIP6 = socket.inet_pton(socket.AF_INET6, "2001:db8::10")
OTHER6 = socket.inet_pton(socket.AF_INET6, "2001:db8::11")
CLIENT4 = socket.inet_pton(socket.AF_INET, "198.51.100.7")
CLIENT6 = socket.inet_pton(socket.AF_INET6, "2001:db8:ffff::7")


@pytest.fixture
def veth_pair(netns_factory: Topology) -> tuple[Netns, Netns, bytes]:
    """Namespaces `cap` (veth `va`) and `peer` (veth `vb`); returns (cap, peer, MAC of va)."""
    cap, peer = netns_factory.add_netns("cap"), netns_factory.add_netns("peer")
    netns_factory.veth(cap, "va", peer, "vb")
    # Until linkwatch attaches their qdisc (up to a second after `link set up`), frames sent
    # on the links are dropped.
    netns_factory.settle()
    with cap.entered():
        mac = bytes.fromhex(mac_of("va"))
    return cap, peer, mac


def mac_of(ifname: str) -> str:
    """The MAC of `ifname` in this thread's namespace (sysfs would show the mount's namespace)."""
    import fcntl

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = fcntl.ioctl(s.fileno(), 0x8927, struct.pack("16s16x", ifname.encode()))
    return ifreq[18:24].hex()


def frame(dst_mac: bytes, ethertype: int, payload: bytes, vlan: int | None = None) -> bytes:
    tag = struct.pack("!HH", 0x8100, vlan) if vlan is not None else b""
    return dst_mac + bytes.fromhex("020000000099") + tag + struct.pack("!H", ethertype) + payload


def ipv4(dst: bytes, marker: bytes) -> bytes:
    body = marker.ljust(16, b"\x00")
    return (
        struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 0, 0, 64, 253, 0, CLIENT4, dst) + body
    )


def ipv6(dst: bytes, marker: bytes) -> bytes:
    body = marker.ljust(16, b"\x00")
    return struct.pack("!IHBB16s16s", 0x60000000, len(body), 253, 64, CLIENT6, dst) + body


def drain(sock: socket.socket, quiet_s: float = 0.3) -> list[bytes]:
    got: list[bytes] = []
    sock.settimeout(quiet_s)
    while True:
        try:
            got.append(sock.recv(65535))
        except TimeoutError:
            return got


def markers(frames: list[bytes]) -> set[bytes]:
    found = set()
    for f in frames:
        at = f.find(b"fsmark-")
        if at >= 0:
            found.add(f[at : at + 9])
    return found


def test_filter_admits_only_vip_frames(veth_pair: tuple[Netns, Netns, bytes]) -> None:
    cap, peer, mac = veth_pair
    with cap.entered():
        # Protocol 0 receives nothing until bound with ETH_P_ALL, so the filter is in place
        # before the first frame can be queued.
        filtered = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        attach_filter(filtered, vip_filter([VIP4, VIP6]))
        filtered.bind(("va", ETH_P_ALL))
        unfiltered = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        unfiltered.bind(("va", ETH_P_ALL))
    with peer.entered():
        sender = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        sender.bind(("vb", 0))
    sends = {
        b"fsmark-01": frame(mac, 0x0800, ipv4(VIP4, b"fsmark-01")),
        b"fsmark-02": frame(mac, 0x0800, ipv4(OTHER4, b"fsmark-02")),
        b"fsmark-03": frame(mac, 0x86DD, ipv6(VIP6, b"fsmark-03")),
        b"fsmark-04": frame(mac, 0x86DD, ipv6(OTHER6, b"fsmark-04")),
        b"fsmark-05": frame(mac, 0x0800, ipv4(VIP4, b"fsmark-05"), vlan=42),
        b"fsmark-06": frame(mac, 0x86DD, ipv6(VIP6, b"fsmark-06"), vlan=43),
        b"fsmark-07": frame(mac, 0x0800, ipv4(OTHER4, b"fsmark-07"), vlan=42),
        b"fsmark-08": frame(mac, 0x0806, b"fsmark-08".ljust(28, b"\x00")),
        b"fsmark-09": frame(mac, 0x0800, ipv4(VIP4, b"fsmark-09"))[: 14 + 19],  # cut before dst
    }
    try:
        time.sleep(0.05)
        for data in sends.values():
            sender.send(data)
        seen = drain(filtered)
        everything = drain(unfiltered, quiet_s=0.05)
        assert markers(seen) == {b"fsmark-01", b"fsmark-03", b"fsmark-05", b"fsmark-06"}
        # The unfiltered socket proves the rejected frames did arrive.
        assert {b"fsmark-02", b"fsmark-04", b"fsmark-07", b"fsmark-08"} <= markers(everything)
        # Nothing else (IPv6 autoconf chatter, ...) got through the filter.
        assert len(seen) == 4

        # Detaching the filter lets other frames in again.
        detach_filter(filtered)
        sender.send(sends[b"fsmark-02"])
        assert b"fsmark-02" in markers(drain(filtered))
    finally:
        for s in (filtered, unfiltered, sender):
            s.close()


def test_kernel_rejects_a_broken_program() -> None:
    # A lone `ja 5`: jumps out of the program and never returns.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, pytest.raises(OSError):
        attach_filter(s, struct.pack("=HBBI", 0x05, 0, 0, 5))
