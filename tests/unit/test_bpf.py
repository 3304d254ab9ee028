"""The VIP socket filter, run by a small classic-BPF interpreter over golden and random frames."""

from __future__ import annotations

import ctypes
import operator
import struct
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowstate.errors import UsageError
from forwarder.bpf import ACCEPT, MAX_INSNS, _SockFprog, drop_all, vip_filter

INSN = struct.Struct("=HBBI")

V4_VIP = bytes([192, 0, 2, 10])
V4_OTHER = bytes([192, 0, 2, 11])
V6_VIP = bytes.fromhex("20010db8000000000000000000000010")
V6_OTHER = bytes.fromhex("20010db8000000000000000000000011")
CLIENT4 = bytes([198, 51, 100, 7])
CLIENT6 = bytes.fromhex("20010db8ffff00000000000000000007")
MACS = bytes.fromhex("020000000001") + bytes.fromhex("020000000002")


class BpfFault(Exception):
    """The program is one the kernel's checker would reject."""


def check_program(program: bytes) -> list[tuple[int, int, int, int]]:
    """The subset of the kernel's `bpf_check_classic` our programs can violate."""
    if not program or len(program) % INSN.size:
        raise BpfFault("length")
    insns = [INSN.unpack_from(program, i) for i in range(0, len(program), INSN.size)]
    if len(insns) > MAX_INSNS:
        raise BpfFault("too long")
    for pc, (code, jt, jf, k) in enumerate(insns):
        if code & 0x07 == 0x05:  # BPF_JMP
            targets = [pc + 1 + k] if code & 0xF0 == 0x00 else [pc + 1 + jt, pc + 1 + jf]
            if any(t >= len(insns) for t in targets):
                raise BpfFault(f"jump out of range at {pc}")
    if insns[-1][0] & 0x07 != 0x06:
        raise BpfFault("last instruction is not a return")
    return insns


ALU_OPS: dict[int, Callable[[int, int], int]] = {
    0x00: operator.add,
    0x10: operator.sub,
    0x20: operator.mul,
    0x30: operator.floordiv,
    0x40: operator.or_,
    0x50: operator.and_,
    0x60: operator.lshift,
    0x70: operator.rshift,
    0x80: lambda a, _k: -a,
    0x90: operator.mod,
    0xA0: operator.xor,
}


def run_bpf(program: bytes, frame: bytes) -> int:
    """Classic BPF as the kernel runs it on a packet socket (loads beyond the frame return 0)."""
    insns = check_program(program)
    a = x = 0
    mem = [0] * 16
    pc = 0

    def load(offset: int, size: int) -> int | None:
        if offset < 0 or offset + size > len(frame):
            return None
        return int.from_bytes(frame[offset : offset + size], "big")

    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        cls = code & 0x07
        if cls in (0x00, 0x01):  # LD, LDX
            size = {0x00: 4, 0x08: 2, 0x10: 1}[code & 0x18]
            mode = code & 0xE0
            if mode == 0x00:
                value: int | None = k
            elif mode == 0x80:
                value = len(frame)
            elif mode == 0x60:
                value = mem[k]
            elif mode == 0x20 and cls == 0x00:
                value = load(k, size)
            elif mode == 0x40 and cls == 0x00:
                value = load(x + k, size)
            elif mode == 0xA0 and cls == 0x01:  # MSH: 4 * (P[k:1] & 0xf)
                byte = load(k, 1)
                value = None if byte is None else 4 * (byte & 0x0F)
            else:
                raise BpfFault(f"bad load {code:#x}")
            if value is None:
                return 0
            if cls == 0x00:
                a = value
            else:
                x = value
        elif cls == 0x02:
            mem[k] = a
        elif cls == 0x03:
            mem[k] = x
        elif cls == 0x04:  # ALU
            operand = x if code & 0x08 else k
            op = code & 0xF0
            if op in (0x30, 0x90) and operand == 0:
                return 0
            a = ALU_OPS[op](a, operand) & 0xFFFFFFFF
        elif cls == 0x05:  # JMP
            op = code & 0xF0
            if op == 0x00:
                pc += k
                continue
            operand = x if code & 0x08 else k
            taken = {
                0x10: a == operand,
                0x20: a > operand,
                0x30: a >= operand,
                0x40: bool(a & operand),
            }[op]
            pc += jt if taken else jf
        elif cls == 0x06:  # RET
            return a if code & 0x18 == 0x10 else k
        else:  # MISC: TAX / TXA
            if code & 0xF8 == 0x00:
                x = a
            else:
                a = x


# ---- frame builders ------------------------------------------------------------------------


def eth(ethertype: int, payload: bytes, tags: Sequence[int] = ()) -> bytes:
    """Ethernet frame with VLAN tags given by TPID (TCI 100 + position)."""
    header = MACS
    for i, tpid in enumerate(tags):
        header += struct.pack("!HH", tpid, 100 + i)
    return header + struct.pack("!H", ethertype) + payload


def ipv4(src: bytes, dst: bytes, payload: bytes = b"\x00" * 8, proto: int = 17) -> bytes:
    return (
        struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0, 64, proto, 0, src, dst)
        + payload
    )


def ipv6(src: bytes, dst: bytes, payload: bytes = b"\x00" * 8, nh: int = 17) -> bytes:
    return struct.pack("!IHBB16s16s", 0x60000000, len(payload), nh, 64, src, dst) + payload


def v4_frame(dst: bytes, tags: Sequence[int] = ()) -> bytes:
    return eth(0x0800, ipv4(CLIENT4, dst), tags)


def v6_frame(dst: bytes, tags: Sequence[int] = ()) -> bytes:
    return eth(0x86DD, ipv6(CLIENT6, dst), tags)


def reference_admits(frame: bytes, vips: Sequence[bytes]) -> bool:
    """What the filter must do, written plainly."""
    offset = 12
    for _tags in range(3):
        if len(frame) < offset + 2:
            return False
        ethertype = int.from_bytes(frame[offset : offset + 2], "big")
        if ethertype in (0x8100, 0x88A8) and _tags < 2:
            offset += 4
            continue
        break
    l3 = offset + 2
    if ethertype == 0x0800:
        dst = frame[l3 + 16 : l3 + 20]
        return len(dst) == 4 and dst in vips
    if ethertype == 0x86DD:
        dst = frame[l3 + 24 : l3 + 40]
        return len(dst) == 16 and dst in vips
    return False


BOTH = [V4_VIP, V6_VIP]

GOLDEN: list[tuple[str, bytes, bool]] = [
    ("ipv4 to VIP", v4_frame(V4_VIP), True),
    ("ipv4 to other", v4_frame(V4_OTHER), False),
    ("ipv4 from VIP (reply traffic)", eth(0x0800, ipv4(V4_VIP, CLIENT4)), False),
    ("ipv6 to VIP", v6_frame(V6_VIP), True),
    ("ipv6 to other", v6_frame(V6_OTHER), False),
    ("ipv6 from VIP", eth(0x86DD, ipv6(V6_VIP, CLIENT6)), False),
    ("ipv6 dst differs in last word", v6_frame(V6_VIP[:15] + b"\x99"), False),
    ("ipv6 dst differs in first word", v6_frame(b"\x30" + V6_VIP[1:]), False),
    ("ipv6 dst differs in middle words", v6_frame(V6_VIP[:6] + b"\xff" + V6_VIP[7:]), False),
    ("802.1Q ipv4 to VIP", v4_frame(V4_VIP, [0x8100]), True),
    ("802.1ad ipv4 to VIP", v4_frame(V4_VIP, [0x88A8]), True),
    ("802.1Q ipv6 to VIP", v6_frame(V6_VIP, [0x8100]), True),
    ("Q-in-Q ipv4 to VIP", v4_frame(V4_VIP, [0x88A8, 0x8100]), True),
    ("Q-in-Q ipv6 to VIP", v6_frame(V6_VIP, [0x88A8, 0x8100]), True),
    ("802.1Q ipv4 to other", v4_frame(V4_OTHER, [0x8100]), False),
    ("three tags", v4_frame(V4_VIP, [0x88A8, 0x8100, 0x8100]), False),
    ("ARP", eth(0x0806, b"\x00" * 28), False),
    ("IPv4 VIP bytes under the IPv6 ethertype", eth(0x86DD, ipv4(CLIENT4, V4_VIP)), False),
    ("IPv4 ethertype with IPv6 VIP", eth(0x0800, ipv6(CLIENT6, V6_VIP)), False),
    ("empty", b"", False),
    ("runt", MACS, False),
    ("ipv4 header cut before dst", v4_frame(V4_VIP)[: 14 + 19], False),
    ("ipv4 header cut right after dst", v4_frame(V4_VIP)[: 14 + 20], True),
    ("ipv6 header cut before dst end", v6_frame(V6_VIP)[: 14 + 39], False),
    ("ipv6 header cut right after dst", v6_frame(V6_VIP)[: 14 + 40], True),
]


@pytest.mark.parametrize(("name", "frame", "admitted"), GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden_frames(name: str, frame: bytes, admitted: bool) -> None:
    verdict = run_bpf(vip_filter(BOTH), frame)
    assert verdict == (ACCEPT if admitted else 0), name
    assert reference_admits(frame, BOTH) is admitted


@pytest.mark.parametrize(("name", "frame", "admitted"), GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden_frames_truncated_at_every_length(name: str, frame: bytes, admitted: bool) -> None:
    program = vip_filter(BOTH)
    for cut in range(len(frame) + 1):
        head = frame[:cut]
        assert (run_bpf(program, head) == ACCEPT) is reference_admits(head, BOTH), (name, cut)


def test_single_family_programs() -> None:
    only_v4 = vip_filter([V4_VIP])
    only_v6 = vip_filter([V6_VIP])
    assert run_bpf(only_v4, v4_frame(V4_VIP)) == ACCEPT
    assert run_bpf(only_v4, v6_frame(V6_VIP)) == 0
    assert run_bpf(only_v6, v6_frame(V6_VIP)) == ACCEPT
    assert run_bpf(only_v6, v4_frame(V4_VIP)) == 0
    # An IPv6 frame whose bytes at the IPv4 dst offset equal an IPv4 VIP is still not admitted.
    tricky = eth(0x86DD, ipv6(CLIENT6, V6_OTHER))
    tricky = tricky[:30] + V4_VIP + tricky[34:]
    assert run_bpf(only_v4, tricky) == 0


def test_no_vips_admits_nothing() -> None:
    program = vip_filter([])
    for _name, frame, _admitted in GOLDEN:
        assert run_bpf(program, frame) == 0
    assert run_bpf(drop_all(), v4_frame(V4_VIP)) == 0


def test_duplicates_are_ignored() -> None:
    assert vip_filter([V4_VIP, V4_VIP, V6_VIP]) == vip_filter([V4_VIP, V6_VIP])


def test_many_vips_need_long_jumps() -> None:
    v4 = [struct.pack("!I", 0x0A000000 + i) for i in range(900)]
    v6 = [V6_VIP[:12] + struct.pack("!I", i) for i in range(240)]
    program = vip_filter(v4 + v6)
    assert len(program) // INSN.size <= MAX_INSNS
    for vip in (v4[0], v4[450], v4[-1]):
        assert run_bpf(program, v4_frame(vip, [0x8100])) == ACCEPT
    for vip in (v6[0], v6[120], v6[-1]):
        assert run_bpf(program, v6_frame(vip)) == ACCEPT
    assert run_bpf(program, v4_frame(struct.pack("!I", 0x0A000000 + 900))) == 0
    assert run_bpf(program, v6_frame(V6_VIP[:12] + struct.pack("!I", 240))) == 0


def test_too_many_vips() -> None:
    with pytest.raises(UsageError, match="BPF instructions"):
        vip_filter([V6_VIP[:12] + struct.pack("!I", i) for i in range(500)])


@pytest.mark.parametrize("bad", [b"", b"\x01\x02\x03", b"\x00" * 5, b"\x00" * 17])
def test_bad_vip_length(bad: bytes) -> None:
    with pytest.raises(UsageError, match="4 or 16 bytes"):
        vip_filter([V4_VIP, bad])


def test_wire_layout() -> None:
    """struct sock_filter is 8 bytes in native order; struct sock_fprog matches the C ABI."""
    program = vip_filter([V4_VIP])
    code, jt, jf, k = struct.unpack_from("=HBBI", program, 0)
    assert (code, jt, jf, k) == (0x28, 0, 0, 12)  # ldh [12]
    assert ctypes.sizeof(_SockFprog) == 2 * ctypes.sizeof(ctypes.c_void_p)
    assert _SockFprog.filter.offset == ctypes.sizeof(ctypes.c_void_p)


frames = st.builds(
    lambda tags, ethertype, head, dst, cut: eth(ethertype, head + dst + bytes(8), tags)[:cut],
    st.lists(st.sampled_from([0x8100, 0x88A8]), max_size=3),
    st.sampled_from([0x0800, 0x86DD, 0x0806, 0x8100, 0x88A8, 0x1234]),
    st.sampled_from(
        [
            ipv4(CLIENT4, V4_VIP)[:16],  # the dst follows: the IPv4 header up to it
            ipv6(CLIENT6, V6_VIP)[:24],
            b"",
        ]
    ),
    st.sampled_from([V4_VIP, V6_VIP, V4_OTHER, V6_OTHER, V6_VIP[:4], b""]),
    st.integers(min_value=0, max_value=80),
)


@settings(max_examples=500, deadline=None)
@given(frames)
def test_filter_agrees_with_reference(frame: bytes) -> None:
    assert (run_bpf(vip_filter(BOTH), frame) == ACCEPT) is reference_admits(frame, BOTH)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=96))
def test_garbage_never_faults(frame: bytes) -> None:
    assert run_bpf(vip_filter(BOTH), frame) in (0, ACCEPT)
    assert (run_bpf(vip_filter(BOTH), frame) == ACCEPT) is reference_admits(frame, BOTH)
