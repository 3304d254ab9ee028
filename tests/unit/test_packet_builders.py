"""The frame builders against hand-written bytes, so the golden expectations (built with them)
rest on something independent of the code under test; and the codes against DATAPATH.md."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

from forwarder.packet import (
    ETH_P_8021AD,
    ETH_P_8021Q,
    ETH_P_IP,
    IP4_DF,
    IPPROTO_ICMP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    TCP_SYN,
    Event,
    Verdict,
    checksum,
    eth,
    frame,
    icmp4_error,
    icmp4_too_big_packet,
    icmp6_error,
    icmp6_too_big_packet,
    ip6_frag,
    ip6_opts,
    ipv4,
    ipv6,
    ones_sum,
    pseudo_header_sum,
    tcp,
    udp,
    vlan,
)

A = ipaddress.ip_address("10.0.0.1").packed
B = ipaddress.ip_address("10.0.0.2").packed
A6 = ipaddress.ip_address("::1").packed
B6 = ipaddress.ip_address("::2").packed
DATAPATH = Path(__file__).resolve().parents[2] / "forwarder" / "DATAPATH.md"


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def test_rfc1071_example() -> None:
    # RFC 1071 section 3: 0001 f203 f4f5 f6f7 sums to ddf2, checksum 220d.
    data = h("0001 f203 f4f5 f6f7")
    assert ones_sum(data) == 0xDDF2
    assert checksum(data) == 0x220D
    assert checksum(b"") == 0xFFFF
    assert ones_sum(b"\x01") == 0x0100  # odd length: padded with a zero byte


def test_ethernet_and_vlan() -> None:
    assert eth(ETH_P_IP) == h("02000000bb01 02000000aa01 0800")
    assert eth(0x0806, dst=b"\xff" * 6, src=b"\x01" * 6) == h("ffffffffffff 010101010101 0806")
    assert vlan(100, ETH_P_IP) == h("0064 0800")
    assert vlan(100, ETH_P_IP, pcp=5) == h("a064 0800")


def test_frame_with_tags_and_padding() -> None:
    packet = h("45") + bytes(19)
    f = frame(packet, vlans=(1, 2), tpid=ETH_P_8021AD, pad_to=60)
    assert f[12:26] == h("88a8 0001 88a8 0002 0800") + h("45000000")[:4]
    assert len(f) == 60 and f[22:42] == packet and f[42:] == bytes(18)
    assert frame(h("60") + bytes(39))[12:14] == h("86dd")
    assert frame(packet, vlans=(9,))[12:18] == h("8100 0009 0800")
    assert ETH_P_8021Q == 0x8100


def test_ipv4_header_wikipedia_example() -> None:
    # The IPv4 header checksum example from Wikipedia ("Internet checksum").
    src = ipaddress.ip_address("192.168.0.1").packed
    dst = ipaddress.ip_address("192.168.0.199").packed
    packet = ipv4(src, dst, bytes(95), proto=IPPROTO_UDP, ttl=64, ident=0, flags_frag=IP4_DF)
    assert packet[:20] == h("4500 0073 0000 4000 4011 b861 c0a8 0001 c0a8 00c7")
    assert len(packet) == 0x73


def test_ipv4_options_and_overrides() -> None:
    packet = ipv4(A, B, b"", proto=IPPROTO_TCP, options=h("01010100"), total_length=7)
    assert packet[0] == 0x46 and packet[2:4] == h("0007") and packet[20:24] == h("01010100")
    assert checksum(packet[:24]) == 0
    assert ipv4(A, B, b"", proto=6, version_ihl=0x44)[0] == 0x44


def test_ipv6_header() -> None:
    packet = ipv6(A6, B6, b"", nh=59, tc=0xAB, flow_label=0x12345, hop_limit=64)
    assert packet == h("6ab12345 0000 3b 40") + A6 + B6
    assert ipv6(A6, B6, b"xy", nh=6)[4:6] == h("0002")
    assert ipv6(A6, B6, b"xy", nh=6, payload_length=0)[4:6] == h("0000")


def test_ipv6_extension_headers() -> None:
    assert ip6_opts(6) == h("06 00 01 04 00000000")
    assert ip6_opts(6, 1) == h("06 01 01 0c") + bytes(12)
    assert ip6_frag(6, 185, more=True, ident=1) == h("06 00 05c9 00000001")
    assert ip6_frag(17) == h("11 00 0000 00000001")


def test_udp_checksum_by_hand() -> None:
    # pseudo 0a00+0001+0a00+0002+0011+0008 = 141c; header 0001+0002+0008 = 000b; ~1427 = ebd8
    assert pseudo_header_sum(A, B, IPPROTO_UDP, 8) == 0x141C
    assert udp(A, B, 1, 2) == h("0001 0002 0008 ebd8")
    assert udp(A, B, 1, 2, partial=True) == h("0001 0002 0008 141c")
    # 141e + 000d + ebd4 = ffff: the checksum is 0 and UDP sends it as ffff
    assert udp(A, B, 1, 2, h("ebd4")) == h("0001 0002 000a ffff ebd4")


def test_tcp_checksum_by_hand() -> None:
    # pseudo 0a00+0001+0a00+0002+0006+0014 = 141d; header 0001+0002+5002 = 5005; ~6422 = 9bdd
    segment = tcp(A, B, 1, 2, flags=TCP_SYN, seq=0, window=0)
    assert segment == h("0001 0002 00000000 00000000 5002 0000 9bdd 0000")
    assert tcp(A, B, 1, 2, flags=TCP_SYN, seq=0, window=0, partial=True)[16:18] == h("141d")
    with_options = tcp(A, B, 1, 2, flags=TCP_SYN, options=bytes(4), payload=b"hi")
    assert with_options[12] == 0x60 and with_options[24:] == b"hi"


def test_icmp_by_hand() -> None:
    # 0800 + 0001 + 0001 = 0802; ~ = f7fd
    assert icmp4_error(8, 0, b"", rest=0x00010001) == h("0800 f7fd 0001 0001")
    # pseudo ::1 ::2 len 8 nh 58: 0001+0002+0008+003a = 0045; + 8000 = 8045; ~ = 7fba
    assert icmp6_error(A6, B6, 128, 0, b"") == h("8000 7fba 00000000")


def test_too_big_packets_match_the_generic_builders() -> None:
    quote = ipv4(B, A, tcp(B, A, 80, 1000, flags=TCP_SYN), proto=IPPROTO_TCP)[:28]
    want4 = ipv4(B, A, icmp4_error(3, 4, quote, rest=1460), proto=IPPROTO_ICMP)
    assert icmp4_too_big_packet(B, A, 1460, quote) == want4
    assert want4[:12] == h("4500 0038 0000 4000 4001") + want4[10:12]
    want6 = ipv6(B6, A6, icmp6_error(B6, A6, 2, 0, b"q" * 33, rest=1460), nh=58)
    assert icmp6_too_big_packet(B6, A6, 1460, b"q" * 33) == want6
    assert want6[40:48] == h("0200") + want6[42:44] + h("000005b4")


def _table(heading: str) -> dict[str, int]:
    """`name -> code` of the markdown table under `## heading` in DATAPATH.md."""
    text = DATAPATH.read_text()
    section = text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \| ([A-Z0-9_]+) \|", section, re.MULTILINE)
    return {name: int(code) for code, name in rows}


def test_codes_match_the_contract() -> None:
    assert _table("Verdicts") == {v.name: v.value for v in Verdict}
    assert _table("Events") == {e.name: e.value for e in Event}
