"""Wire constants, verdict and event codes, checksums and packet builders of the data path.

Pure functions only. The engine uses the constants, checksums and header builders; tests and
benchmarks use the frame builders (`eth`, `vlan`, `ipv4`, `ipv6`, `tcp`, `udp`, `icmp4_error`, …).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence

# --- wire constants ------------------------------------------------------------------------------

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8
VLAN_TPIDS = (ETH_P_8021Q, ETH_P_8021AD)

IPPROTO_HOPOPTS = 0
IPPROTO_ICMP = 1
IPPROTO_IPIP = 4
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_IPV6 = 41
IPPROTO_ROUTING = 43
IPPROTO_FRAGMENT = 44
IPPROTO_ICMPV6 = 58
IPPROTO_NONE = 59
IPPROTO_DSTOPTS = 60
#: IPv6 extension headers the parser walks (DATAPATH.md "Parsing").
IPV6_EXT_HEADERS = frozenset((IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_FRAGMENT, IPPROTO_DSTOPTS))

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_PSH = 0x08
TCP_ACK = 0x10

IP4_DF = 0x4000
IP4_MF = 0x2000
IP4_OFFSET_MASK = 0x1FFF

ICMP4_DEST_UNREACH = 3
ICMP4_FRAG_NEEDED = 4  # code of type 3
ICMP4_ECHO_REQUEST = 8
ICMP6_DEST_UNREACH = 1
ICMP6_PACKET_TOO_BIG = 2
ICMP6_ECHO_REQUEST = 128

#: tp_status bit: the L4 checksum field holds only the pseudo-header sum.
TP_STATUS_CSUMNOTREADY = 0x8

ETH_HLEN = 14
VLAN_HLEN = 4
MAX_VLAN_TAGS = 2
IPV4_HLEN = 20
IPV6_HLEN = 40
MAX_EXT_HEADERS = 8
#: Bytes the outer IPv6 header adds to every forwarded packet.
ENCAP_OVERHEAD = IPV6_HLEN
OUTER_HOP_LIMIT = 64
IPV6_MIN_MTU = 1280
#: Largest number of ICMP too-big answers one `process` call sends.
ICMP_BUDGET = 100
#: Flow table bucket width.
BUCKET_SLOTS = 8

#: Flow entry states.
STATE_ESTABLISHED = 1
STATE_CLOSING = 2

#: `tx` destination meaning "send this Ethernet frame back out of the receive interface".
REPLY = -1

#: Last element of a `Result.misses` item: a packet of the flow itself, or an ICMP error quoting
#: it (which must never create state: DATAPATH.md "ICMP errors about unknown flows").
MISS_PACKET = 0
MISS_ICMP = 1


class Verdict(enum.IntEnum):
    """What the engine did with one frame (one byte per frame in `Result.verdicts`)."""

    FORWARD = 0
    NEW = 1
    MISS = 2
    PASS_NOT_IP = 3
    PASS_NOT_VIP = 4
    PASS_NOT_SERVICE = 5
    REPLY_TOO_BIG = 6
    DROP_ETH_SHORT = 10
    DROP_IP4_SHORT = 11
    DROP_IP4_VERSION = 12
    DROP_IP4_IHL = 13
    DROP_IP4_LENGTH = 14
    DROP_IP6_SHORT = 15
    DROP_IP6_VERSION = 16
    DROP_IP6_LENGTH = 17
    DROP_IP6_EXT = 18
    DROP_FRAGMENT = 19
    DROP_L4_SHORT = 20
    DROP_ICMP_SHORT = 21
    DROP_ICMP_BAD_QUOTE = 22
    DROP_NO_BACKEND = 23
    DROP_NO_ROUTE = 24
    DROP_TOO_BIG = 25

    @property
    def is_drop(self) -> bool:
        return self >= Verdict.DROP_ETH_SHORT

    @property
    def is_pass(self) -> bool:
        return Verdict.PASS_NOT_IP <= self <= Verdict.PASS_NOT_SERVICE


class Event(enum.IntEnum):
    """Flow events the engine reports to the slow path."""

    NEW = 1
    CLOSE = 2
    TOUCH = 3
    EVICTED = 4


# --- checksums -----------------------------------------------------------------------------------


def ones_sum(data: bytes, initial: int = 0) -> int:
    """Folded 16-bit one's complement sum of `data` (odd length: padded with a zero byte).

    Uses 2**16 == 1 (mod 0xFFFF): the big-endian value of the data is congruent to the sum of its
    16-bit words, and a folded sum is never 0 unless every word is 0.
    """
    if len(data) & 1:
        data += b"\x00"
    total = int.from_bytes(data, "big") + initial
    if total == 0:
        return 0
    return total % 0xFFFF or 0xFFFF


def checksum(data: bytes, initial: int = 0) -> int:
    """Internet checksum (RFC 1071) of `data`, starting from an unfolded or folded `initial` sum."""
    return 0xFFFF - ones_sum(data, initial)


def pseudo_header_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """Folded sum of the IPv4 or IPv6 pseudo-header (addresses of equal length)."""
    if len(src) == 4:
        return ones_sum(src + dst + struct.pack("!BBH", 0, proto, length))
    return ones_sum(src + dst + struct.pack("!IxxxB", length, proto))


# --- headers the engine writes -------------------------------------------------------------------

_IPV6 = struct.Struct("!IHBB16s16s")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")


def ipv6_header(
    src: bytes,
    dst: bytes,
    payload_len: int,
    next_header: int,
    *,
    traffic_class: int = 0,
    flow_label: int = 0,
    hop_limit: int = OUTER_HOP_LIMIT,
) -> bytes:
    """A 40-byte IPv6 header (the encapsulation's outer header, or an ICMPv6 answer's)."""
    word = (6 << 28) | (traffic_class << 20) | flow_label
    return _IPV6.pack(word, payload_len, next_header, hop_limit, src, dst)


def icmp4_too_big_packet(vip: bytes, client: bytes, mtu: int, quote: bytes) -> bytes:
    """IPv4 packet VIP → client: ICMP type 3 code 4 quoting `quote`, DF set, TTL 64, id 0."""
    body = struct.pack("!BBHHH", ICMP4_DEST_UNREACH, ICMP4_FRAG_NEEDED, 0, 0, mtu) + quote
    body = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
    header = _IPV4.pack(0x45, 0, IPV4_HLEN + len(body), 0, IP4_DF, 64, IPPROTO_ICMP, 0, vip, client)
    return header[:10] + struct.pack("!H", checksum(header)) + header[12:] + body


def icmp6_too_big_packet(vip: bytes, client: bytes, mtu: int, quote: bytes) -> bytes:
    """IPv6 packet VIP → client: ICMPv6 packet too big quoting `quote`, hop limit 64."""
    body = struct.pack("!BBHI", ICMP6_PACKET_TOO_BIG, 0, 0, mtu) + quote
    csum = checksum(body, pseudo_header_sum(vip, client, IPPROTO_ICMPV6, len(body)))
    body = body[:2] + struct.pack("!H", csum) + body[4:]
    return ipv6_header(vip, client, len(body), IPPROTO_ICMPV6) + body


# --- frame builders (tests, benchmarks, the lab) -------------------------------------------------

MAC_CLIENT_SIDE = bytes.fromhex("02000000aa01")  # the router that hands us the VIP's traffic
MAC_FORWARDER = bytes.fromhex("02000000bb01")  # this forwarder's receive interface


def eth(ethertype: int, *, dst: bytes = MAC_FORWARDER, src: bytes = MAC_CLIENT_SIDE) -> bytes:
    """A 14-byte Ethernet header."""
    return dst + src + struct.pack("!H", ethertype)


def vlan(vid: int, ethertype: int, *, pcp: int = 0) -> bytes:
    """The 4 bytes following a 0x8100/0x88A8 type: TCI, then the next ethertype."""
    return struct.pack("!HH", (pcp << 13) | vid, ethertype)


def frame(
    packet: bytes,
    *,
    vlans: Sequence[int] = (),
    tpid: int = ETH_P_8021Q,
    dst: bytes = MAC_FORWARDER,
    src: bytes = MAC_CLIENT_SIDE,
    pad_to: int = 0,
) -> bytes:
    """An Ethernet frame around an IPv4/IPv6 packet, with VLAN tags and zero padding to `pad_to`."""
    l3_type = ETH_P_IP if packet[0] >> 4 == 4 else ETH_P_IPV6
    if not vlans:
        out = eth(l3_type, dst=dst, src=src)
    else:
        out = eth(tpid, dst=dst, src=src)
        for i, vid in enumerate(vlans):
            out += vlan(vid, tpid if i + 1 < len(vlans) else l3_type)
    out += packet
    return out + bytes(max(0, pad_to - len(out)))


def ipv4(
    src: bytes,
    dst: bytes,
    payload: bytes,
    *,
    proto: int,
    tos: int = 0,
    ttl: int = 64,
    ident: int = 0,
    flags_frag: int = IP4_DF,
    options: bytes = b"",
    total_length: int | None = None,
    version_ihl: int | None = None,
) -> bytes:
    """IPv4 header (valid checksum) + payload. `options` must be a multiple of 4 bytes long."""
    hlen = IPV4_HLEN + len(options)
    vi = (0x40 | hlen // 4) if version_ihl is None else version_ihl
    length = hlen + len(payload) if total_length is None else total_length
    header = _IPV4.pack(vi, tos, length, ident, flags_frag, ttl, proto, 0, src, dst) + options
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + payload


def ipv6(
    src: bytes,
    dst: bytes,
    payload: bytes,
    *,
    nh: int,
    tc: int = 0,
    flow_label: int = 0,
    hop_limit: int = 64,
    payload_length: int | None = None,
) -> bytes:
    """IPv6 header + payload (extension headers are part of `payload`)."""
    plen = len(payload) if payload_length is None else payload_length
    header = ipv6_header(
        src, dst, plen, nh, traffic_class=tc, flow_label=flow_label, hop_limit=hop_limit
    )
    return header + payload


def ip6_opts(next_header: int, hdr_ext_len: int = 0) -> bytes:
    """A hop-by-hop or destination options header of `8 * (hdr_ext_len + 1)` bytes (PadN)."""
    size = 8 * (hdr_ext_len + 1)
    return struct.pack("!BBBB", next_header, hdr_ext_len, 1, size - 4) + bytes(size - 4)


def ip6_frag(next_header: int, offset: int = 0, *, more: bool = False, ident: int = 1) -> bytes:
    """An 8-byte fragment header; `offset` in 8-byte units."""
    return struct.pack("!BBHI", next_header, 0, (offset << 3) | int(more), ident)


def _l4_checksummed(
    segment: bytes, src: bytes, dst: bytes, proto: int, at: int, partial: bool
) -> bytes:
    """Store the L4 checksum at `at`: the full checksum, or (`partial`) only the pseudo-header
    sum, which is what a CSUMNOTREADY frame carries."""
    pseudo = pseudo_header_sum(src, dst, proto, len(segment))
    if partial:
        value = pseudo
    else:
        value = checksum(segment, pseudo)
        if proto == IPPROTO_UDP and value == 0:
            value = 0xFFFF
    return segment[:at] + struct.pack("!H", value) + segment[at + 2 :]


def tcp(
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    *,
    flags: int,
    seq: int = 1000,
    ack: int = 0,
    window: int = 65535,
    payload: bytes = b"",
    options: bytes = b"",
    partial: bool = False,
) -> bytes:
    """A TCP segment with its checksum over the pseudo-header of `src` → `dst`."""
    doff = (20 + len(options)) // 4
    segment = (
        struct.pack("!HHIIBBHHH", sport, dport, seq, ack, doff << 4, flags, window, 0, 0)
        + options
        + payload
    )
    return _l4_checksummed(segment, src, dst, IPPROTO_TCP, 16, partial)


def udp(
    src: bytes, dst: bytes, sport: int, dport: int, payload: bytes = b"", *, partial: bool = False
) -> bytes:
    """A UDP datagram with its checksum over the pseudo-header of `src` → `dst`."""
    segment = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    return _l4_checksummed(segment, src, dst, IPPROTO_UDP, 6, partial)


def icmp4_error(type_: int, code: int, quote: bytes, *, rest: int = 0) -> bytes:
    """An ICMP message: type, code, checksum, 4 bytes `rest` (e.g. next-hop MTU), then `quote`.

    Also builds non-errors (echo: `rest` = id << 16 | seq, `quote` = data).
    """
    body = struct.pack("!BBHI", type_, code, 0, rest) + quote
    return body[:2] + struct.pack("!H", checksum(body)) + body[4:]


def icmp6_error(
    src: bytes, dst: bytes, type_: int, code: int, quote: bytes, *, rest: int = 0
) -> bytes:
    """An ICMPv6 message with its checksum over the pseudo-header of `src` → `dst`."""
    body = struct.pack("!BBHI", type_, code, 0, rest) + quote
    csum = checksum(body, pseudo_header_sum(src, dst, IPPROTO_ICMPV6, len(body)))
    return body[:2] + struct.pack("!H", csum) + body[4:]
