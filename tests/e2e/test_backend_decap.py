"""deploy/backend-setup against real traffic: decapsulation, direct replies, MSS, undo.

Three namespaces: `client` (linked to both others), `fwd` (sends the encapsulated packets) and
`backend` (runs backend-setup). The backend's default routes lead to the client over its own
link, so a reply that reaches the client on that link went directly, not through `fwd`.
"""

from __future__ import annotations

import http.client
import ipaddress
import select
import shutil
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.netns import Netns, Topology, wait_until

pytestmark = pytest.mark.e2e

SETUP = str(Path(__file__).resolve().parents[2] / "deploy" / "backend-setup")

VIP = {4: "192.0.2.10", 6: "2001:db8:f::10"}
CLIENT = {4: "198.51.100.2", 6: "2001:db8:c1::2"}  # the client's address, on its fwd link
FWD = {4: "198.51.100.1", 6: "2001:db8:c1::1"}  # fwd's address on that link
DECAP = "2001:db8:b::1"
FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}
NEXT_HEADER = {4: 4, 6: 41}  # IPv4-in-IPv6, IPv6-in-IPv6

SOL_PACKET = 263
PACKET_AUXDATA = 8
ETH_P_ALL = 0x0003
TP_STATUS_CSUMNOTREADY = 1 << 3
IP_PKTINFO = 8
PROTO_TCP = 6
PROTO_UDP = 17


# ---------------------------------------------------------------- packets


def inet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int(word) for word in struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _pseudo_header(src: str, dst: str, proto: int, length: int) -> bytes:
    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    if len(s) == 4:
        return s + d + struct.pack("!BBH", 0, proto, length)
    return s + d + struct.pack("!I3xB", length, proto)


def ip_packet(src: str, dst: str, proto: int, segment: bytes, csum_at: int) -> bytes:
    """An IPv4 or IPv6 packet around a TCP/UDP segment whose checksum (at `csum_at`) is filled."""
    csum = inet_checksum(_pseudo_header(src, dst, proto, len(segment)) + segment)
    if proto == PROTO_UDP and csum == 0:
        csum = 0xFFFF
    segment = segment[:csum_at] + struct.pack("!H", csum) + segment[csum_at + 2 :]
    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    if len(s) == 4:
        header = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(segment), 1, 0, 64, proto, 0) + s + d
        header = header[:10] + struct.pack("!H", inet_checksum(header)) + header[12:]
        return header + segment
    return struct.pack("!IHBB", 6 << 28, len(segment), proto, 64) + s + d + segment


def udp_packet(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    segment = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    return ip_packet(src, dst, PROTO_UDP, segment, 6)


def tcp_syn(src: str, dst: str, sport: int, dport: int, mss: int = 1460) -> bytes:
    options = struct.pack("!BBH", 2, 4, mss)
    segment = struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, 6 << 4, 0x02, 65535, 0, 0) + options
    return ip_packet(src, dst, PROTO_TCP, segment, 16)


def l3_offsets(packet: bytes) -> tuple[int, int, str, str]:
    """(L4 protocol, L4 offset, src, dst) of an IPv4 or IPv6 packet without extension headers."""
    if packet[0] >> 4 == 4:
        ihl = (packet[0] & 0x0F) * 4
        src, dst = (
            socket.inet_ntop(socket.AF_INET, packet[12:16]),
            socket.inet_ntop(socket.AF_INET, packet[16:20]),
        )
        return packet[9], ihl, src, dst
    src = socket.inet_ntop(socket.AF_INET6, packet[8:24])
    return packet[6], 40, src, socket.inet_ntop(socket.AF_INET6, packet[24:40])


def complete_l4_checksum(packet: bytes) -> bytes:
    """What the forwarder must do for TP_STATUS_CSUMNOTREADY frames: finish the TCP/UDP sum."""
    proto, offset, src, dst = l3_offsets(packet)
    csum_at = {PROTO_TCP: 16, PROTO_UDP: 6}.get(proto)
    if csum_at is None:
        return packet
    segment = packet[offset:]
    segment = segment[:csum_at] + b"\0\0" + segment[csum_at + 2 :]
    return packet[:offset] + ip_packet(src, dst, proto, segment, csum_at)[-len(segment) :]


def syn_ack_mss(frame: bytes, vip: str) -> int | None:
    """The MSS option of a SYN-ACK from `vip` in an Ethernet frame, or None if it is not one."""
    ethertype = struct.unpack("!H", frame[12:14])[0]
    if ethertype not in (0x0800, 0x86DD):
        return None
    proto, offset, src, _ = l3_offsets(frame[14:])
    tcp = frame[14 + offset :]
    if proto != PROTO_TCP or src != vip or len(tcp) < 20 or tcp[13] & 0x12 != 0x12:
        return None
    options, i = tcp[20 : (tcp[12] >> 4) * 4], 0
    while i < len(options) and options[i] != 0:
        if options[i] == 1:
            i += 1
            continue
        if options[i] == 2:
            return int(struct.unpack("!H", options[i + 2 : i + 4])[0])
        i += max(options[i + 1], 2)
    return None


# ---------------------------------------------------------------- topology


@dataclass
class Lab:
    topo: Topology
    client: Netns
    fwd: Netns
    backend: Netns
    state_dir: Path

    def setup(self, *args: str, check: bool = True) -> str:
        """Run deploy/backend-setup in the backend; returns stdout + stderr."""
        result = self.backend.run(
            [SETUP, *args], check=check, env={"FLOWSTATE_STATE_DIR": str(self.state_dir)}
        )
        return result.stdout + result.stderr

    def setup_vips(self, *extra: str) -> str:
        return self.setup(
            "--vip", VIP[4], "--vip", VIP[6], "--decap-addr", DECAP, "--dev", "bf0", *extra
        )

    def send_encapsulated(self, inner: bytes, family: int) -> None:
        """Send `inner` from fwd in an outer IPv6 header to the decap address (kernel adds it)."""
        with self.fwd.socket(socket.AF_INET6, socket.SOCK_RAW, NEXT_HEADER[family]) as raw:
            raw.sendto(inner, (DECAP, 0))


@pytest.fixture
def lab(netns_factory: Topology, tmp_path: Path) -> Lab:
    topo = netns_factory
    client, fwd, backend = (topo.add_netns(r) for r in ("client", "fwd", "backend"))
    topo.veth(
        client, "cf0", fwd, "fc0",
        a_addrs=["198.51.100.2/24", "2001:db8:c1::2/64"],
        b_addrs=["198.51.100.1/24", "2001:db8:c1::1/64"],
    )  # fmt: skip
    topo.veth(
        client, "cb0", backend, "bc0",
        a_addrs=["203.0.113.2/24", "2001:db8:c2::2/64"],
        b_addrs=["203.0.113.1/24", "2001:db8:c2::1/64"],
    )  # fmt: skip
    topo.veth(
        fwd, "fb0", backend, "bf0", a_addrs=["2001:db8:fb::1/64"], b_addrs=["2001:db8:fb::2/64"]
    )
    for family in (4, 6):
        client.add_route(VIP[family], FWD[family])
        # fwd's own stack must stay silent about VIP packets (IPv6 would answer "no route").
        fwd.ip(f"-{family}", "route", "add", "blackhole", VIP[family])
    fwd.add_route(f"{DECAP}/128", "2001:db8:fb::2")
    # The backend reaches "the internet" (the client) over its own link: replies go direct.
    backend.add_route("default", "203.0.113.2")
    backend.add_route("default", "2001:db8:c2::2")
    client.set_sysctl("net.ipv4.conf.all.rp_filter", 0)
    client.set_sysctl("net.ipv4.conf.cb0.rp_filter", 0)
    # Like a stock distribution: strict reverse-path filtering, which backend-setup must lift.
    backend.set_sysctl("net.ipv4.conf.all.rp_filter", 1)
    backend.set_sysctl("net.ipv4.conf.bf0.rp_filter", 1)
    topo.settle()
    return Lab(topo, client, fwd, backend, tmp_path / "state")


def kernel_has_ip6tnl(ns: Netns) -> bool:
    probe = ns.run(["ip", "link", "add", "fsprobe", "type", "ip6tnl", "external"], check=False)
    if probe.returncode == 0:
        ns.ip("link", "del", "fsprobe")
    return probe.returncode == 0


# ---------------------------------------------------------------- sockets and a relay


def udp_socket(ns: Netns, family: int, addr: str, port: int) -> socket.socket:
    sock = ns.socket(FAMILY[family], socket.SOCK_DGRAM)
    sock.settimeout(3)
    if family == 4:
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
    sock.bind((addr, port))
    return sock


def recv_with_ifindex(sock: socket.socket) -> tuple[bytes, str, int, int]:
    """(data, source address, source port, index of the interface it arrived on)."""
    data, ancdata, _, addr = sock.recvmsg(4096, socket.CMSG_SPACE(64))
    ifindex = -1
    for level, kind, value in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
            ifindex = struct.unpack("i", value[:4])[0]
        elif level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
            ifindex = struct.unpack("i", value[16:20])[0]
    return data, addr[0], addr[1], ifindex


class EncapRelay(threading.Thread):
    """Test tool, not the product: capture client->VIP frames on fwd and resend them encapsulated.

    With `complete_checksums` it finishes the L4 checksum of frames marked
    TP_STATUS_CSUMNOTREADY, as the product's fast path must.
    """

    def __init__(self, fwd: Netns, dev: str, *, complete_checksums: bool) -> None:
        super().__init__(daemon=True)
        self.complete_checksums = complete_checksums
        self.relayed = 0
        self.csum_not_ready = 0
        self.csum_completed = 0
        self._stop_event = threading.Event()
        self._capture = fwd.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self._capture.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
        self._capture.bind((dev, 0))
        self._raw = {
            f: fwd.socket(socket.AF_INET6, socket.SOCK_RAW, NEXT_HEADER[f]) for f in (4, 6)
        }

    def run(self) -> None:
        while not self._stop_event.is_set():
            if not select.select([self._capture], [], [], 0.05)[0]:
                continue
            frame, ancdata, _, addr = self._capture.recvmsg(65535, socket.CMSG_SPACE(32))
            if addr[2] != socket.PACKET_HOST or len(frame) < 34:
                continue
            status = 0
            for level, kind, value in ancdata:
                if level == SOL_PACKET and kind == PACKET_AUXDATA:
                    status = struct.unpack("I", value[:4])[0]
            ethertype = struct.unpack("!H", frame[12:14])[0]
            family = {0x0800: 4, 0x86DD: 6}.get(ethertype)
            if family is None:
                continue
            packet = frame[14:]
            if l3_offsets(packet)[3] != VIP[family]:
                continue
            if status & TP_STATUS_CSUMNOTREADY:
                self.csum_not_ready += 1
                if self.complete_checksums:
                    packet = complete_l4_checksum(packet)
                    self.csum_completed += 1
            self._raw[family].sendto(packet, (DECAP, 0))
            self.relayed += 1

    def stop(self) -> None:
        self._stop_event.set()
        self.join(2)
        for sock in (self._capture, *self._raw.values()):
            sock.close()


@pytest.fixture
def relay_factory() -> Iterator[list[EncapRelay]]:
    relays: list[EncapRelay] = []
    yield relays
    for relay in relays:
        relay.stop()


def start_relay(relays: list[EncapRelay], lab: Lab, *, complete_checksums: bool) -> EncapRelay:
    relay = EncapRelay(lab.fwd, "fc0", complete_checksums=complete_checksums)
    relays.append(relay)
    relay.start()
    return relay


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("family", [4, 6])
def test_udp_is_decapsulated_and_answered_directly(lab: Lab, family: int) -> None:
    out = lab.setup_vips()
    mode = "ip6tnl" if kernel_has_ip6tnl(lab.fwd) else "seg6local"
    assert f"decap mode: {mode}" in out
    # Not needed by seg6local decapsulation without an SRH, so backend-setup leaves them alone.
    assert lab.backend.sysctl("net.ipv6.conf.all.forwarding") == "0"
    assert lab.backend.sysctl("net.ipv6.conf.all.seg6_enabled") == "0"

    with (
        udp_socket(lab.backend, family, VIP[family], 7777) as server,
        udp_socket(lab.client, family, CLIENT[family], 5555) as client,
    ):
        inner = udp_packet(CLIENT[family], VIP[family], 5555, 7777, b"ping")
        lab.send_encapsulated(inner, family)

        data, src, sport, _ = recv_with_ifindex(server)
        assert (data, src, sport) == (b"ping", CLIENT[family], 5555)
        server.sendto(b"pong", (src, sport))

        data, src, sport, ifindex = recv_with_ifindex(client)
        assert (data, src, sport) == (b"pong", VIP[family], 7777)
        assert ifindex == lab.client.ifindex("cb0"), "the reply must come over the backend link"


def test_strict_rp_filter_drops_decapsulated_ipv4(lab: Lab) -> None:
    """Why backend-setup sets rp_filter=0: the inner packet arrives where no route to it leads."""
    lab.setup_vips()
    lab.backend.set_sysctl("net.ipv4.conf.all.rp_filter", 1)
    with udp_socket(lab.backend, 4, VIP[4], 7777) as server:
        lab.send_encapsulated(udp_packet(CLIENT[4], VIP[4], 5555, 7777, b"x"), 4)
        server.settimeout(0.5)
        with pytest.raises(TimeoutError):
            server.recvfrom(100)


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("method", ["none", "route", "nft"])
def test_syn_ack_advertises_lowered_mss(lab: Lab, family: int, method: str) -> None:
    if method == "nft" and shutil.which("nft") is None:
        pytest.skip("nft is not installed")
    lab.setup_vips(*(["--mss", "0"] if method == "none" else ["--mss-method", method]))
    expected = 1400 if method != "none" else 1500 - (40 if family == 4 else 60)

    capture = lab.client.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    capture.bind(("cb0", 0))
    capture.settimeout(3)
    with lab.backend.socket(FAMILY[family], socket.SOCK_STREAM) as listener, capture:
        listener.bind((VIP[family], 8080))
        listener.listen()
        lab.send_encapsulated(tcp_syn(CLIENT[family], VIP[family], 40000, 8080), family)
        mss = None
        while mss is None:
            mss = syn_ack_mss(capture.recv(65535), VIP[family])
    assert mss == expected


@pytest.mark.parametrize("family", [4, 6])
def test_http_get_through_encapsulating_relay(
    lab: Lab, relay_factory: list[EncapRelay], tmp_path: Path, family: int
) -> None:
    lab.setup_vips()
    site = tmp_path / "site"
    site.mkdir()
    body = b"served from the backend\n" * 100
    (site / "index.html").write_bytes(body)
    server = lab.backend.popen(
        ["python3", "-m", "http.server", "8080", "--bind", VIP[family], "--directory", str(site)]
    )
    listening = wait_until(
        lambda: (
            lab.backend.run(["ss", "-Hltn", f"src {VIP[family]}:8080"]).stdout.strip()
            or server.poll() is not None
        )
    )
    if not listening or server.poll() is not None:
        lab.backend.stop(server)
        pytest.fail(f"http.server did not start: {server.communicate()}")
    relay = start_relay(relay_factory, lab, complete_checksums=True)
    rx_before = lab.client.link_stat("cb0", "rx_bytes")

    with lab.client.entered():
        conn = http.client.HTTPConnection(
            VIP[family], 8080, timeout=5, source_address=(CLIENT[family], 0)
        )
        conn.connect()
    try:
        assert conn.sock is not None
        # The client's segments carry 40 more bytes in the tunnel: the backend asked for <= 1400.
        assert conn.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG) <= 1400
        conn.request("GET", "/index.html")
        response = conn.getresponse()
        assert response.status == 200
        assert response.read() == body
    finally:
        conn.close()
    assert relay.relayed >= 3  # SYN, ACK, request at least
    assert lab.client.link_stat("cb0", "rx_bytes") - rx_before > len(body)


@pytest.mark.parametrize("family", [4, 6])
def test_partial_checksums_from_veth_must_be_completed(
    lab: Lab, relay_factory: list[EncapRelay], family: int
) -> None:
    """A veth sender with tx checksum offload (the default) hands AF_PACKET frames with only the
    pseudo-header sum in the L4 checksum (TP_STATUS_CSUMNOTREADY). Relayed as is, the backend
    drops them as bad checksums; completed, or sent with `ethtool -K tx off`, they arrive."""
    lab.setup_vips()
    relay = start_relay(relay_factory, lab, complete_checksums=False)
    csum_errors = "UdpInCsumErrors" if family == 4 else "Udp6InCsumErrors"
    with (
        udp_socket(lab.backend, family, VIP[family], 7777) as server,
        lab.client.socket(FAMILY[family], socket.SOCK_DGRAM) as client,
    ):
        client.bind((CLIENT[family], 0))
        server.settimeout(0.7)

        errors_before = lab.backend.snmp()[csum_errors]
        client.sendto(b"partial", (VIP[family], 7777))
        with pytest.raises(TimeoutError):
            server.recvfrom(100)
        assert relay.csum_not_ready == 1, (
            relay.relayed,
            lab.backend.snmp()[csum_errors],
            errors_before,
        )
        assert lab.backend.snmp()[csum_errors] == errors_before + 1

        relay.complete_checksums = True
        client.sendto(b"completed", (VIP[family], 7777))
        assert server.recvfrom(100)[0] == b"completed"

        relay.complete_checksums = False
        lab.client.disable_offloads("cf0", ("tx",))
        client.sendto(b"full", (VIP[family], 7777))
        assert server.recvfrom(100)[0] == b"full"
        assert relay.csum_not_ready == 2  # the frame sent with tx off was complete


def _snapshot(ns: Netns) -> str:
    commands = [
        "ip addr show",
        "ip -4 rule show",
        "ip -6 rule show",
        "ip -4 route show table all",
        "ip -6 route show table all",
        "ip link show",
        "sysctl net.ipv4.conf.all.rp_filter net.ipv4.conf.bf0.rp_filter",
        "sysctl net.ipv4.conf.all.arp_ignore net.ipv4.conf.all.arp_announce",
    ]
    if shutil.which("nft"):
        commands.append("nft list ruleset")
    return "\n".join(ns.run(command).stdout for command in commands)


def test_setup_is_idempotent_and_undo_restores_everything(lab: Lab) -> None:
    before = _snapshot(lab.backend)
    lab.setup_vips("--mss-method", "route")
    once = _snapshot(lab.backend)
    assert once != before
    lab.setup_vips("--mss-method", "route")
    assert _snapshot(lab.backend) == once

    # A rerun with other settings converges: old decap address and MSS method are gone.
    lab.setup("--vip", VIP[4], "--decap-addr", "2001:db8:b::2", "--dev", "bf0")
    changed = _snapshot(lab.backend)
    assert DECAP not in changed and "2001:db8:b::2" in changed
    assert VIP[6] not in changed and "advmss" not in changed

    lab.setup("--undo")
    assert _snapshot(lab.backend) == before
    assert "undone" in lab.setup("--undo")
    assert _snapshot(lab.backend) == before
    assert not lab.state_dir.exists() or not any(lab.state_dir.iterdir())


def test_errors_are_clear_and_change_nothing(lab: Lab) -> None:
    before = _snapshot(lab.backend)

    def fails(*args: str) -> tuple[int, str]:
        result = lab.backend.run(
            [SETUP, *args], check=False, env={"FLOWSTATE_STATE_DIR": str(lab.state_dir)}
        )
        assert result.returncode != 0
        return result.returncode, result.stderr

    assert fails("--vip", "192.0.2.300", "--decap-addr", DECAP)[1].startswith(
        "backend-setup: error: --vip 192.0.2.300 is not an IPv4 or IPv6 address"
    )
    assert "--decap-addr is required" in fails("--vip", VIP[4])[1]
    assert "not an IPv6 address" in fails("--vip", VIP[4], "--decap-addr", "10.0.0.1")[1]
    code, err = fails("--vip", VIP[4], "--decap-addr", "2001:db8:fb::2", "--mode", "seg6local")
    assert code == 1 and "assigned to an interface" in err
    assert "no such interface" in fails("--vip", VIP[4], "--decap-addr", DECAP, "--dev", "nope")[1]
    if not kernel_has_ip6tnl(lab.backend):
        err = fails("--vip", VIP[4], "--decap-addr", DECAP, "--dev", "bf0", "--mode", "ip6tnl")[1]
        assert "CONFIG_IPV6_TUNNEL" in err
    assert _snapshot(lab.backend) == before


def test_not_root_is_refused(lab: Lab) -> None:
    result = lab.backend.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", SETUP, "--vip", VIP[4],
         "--decap-addr", DECAP],
        check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "must run as root" in result.stderr
