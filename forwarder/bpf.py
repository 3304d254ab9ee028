"""Classic BPF socket filter that admits only frames addressed to a VIP, and its attachment.

The filter runs in the kernel before a frame is queued on the AF_PACKET socket, so the forwarder
never copies (or wakes up for) the host's other traffic. It decides on the destination address
alone; ports, protocols and malformed packets are the engine's business.

VLAN tags: on Linux the receive path moves the outermost 802.1Q/802.1ad tag of a frame into skb
metadata (`skb_vlan_untag` in `__netif_receive_skb_core`) before packet taps and their filters
see it, so the usual case is an untagged-looking frame. A second tag of a Q-in-Q frame, a frame
seen on a path that does not untag, and the frames of an interpreter in a test still carry tags in
the data. The program therefore skips up to two tags (0x8100 or 0x88A8) found in the frame
itself, the limit the engine's parser also applies, and admits a VIP frame whether a tag sits in
metadata (SKF_AD_VLAN_TAG_PRESENT is deliberately not consulted: the VLAN does not change whether
a frame is ours) or in the data. The receive loop puts a stripped tag back into the frame.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from collections.abc import Sequence

from flowstate.errors import UsageError

__all__ = [
    "ACCEPT",
    "MAX_INSNS",
    "SO_ATTACH_FILTER",
    "SO_DETACH_FILTER",
    "attach_filter",
    "detach_filter",
    "drop_all",
    "vip_filter",
]

# Opcodes (linux/filter.h, linux/bpf_common.h).
BPF_LD, BPF_LDX, BPF_JMP, BPF_RET = 0x00, 0x01, 0x05, 0x06
BPF_W, BPF_H = 0x00, 0x08
BPF_IMM, BPF_ABS, BPF_IND = 0x00, 0x20, 0x40
BPF_JA, BPF_JEQ = 0x00, 0x10
BPF_K = 0x00

#: The return value of an admitted frame: the whole frame (tcpdump's snap length).
ACCEPT = 0x40000
#: The kernel's limit on classic BPF program length (BPF_MAXINSNS).
MAX_INSNS = 4096
#: Socket options (asm-generic/socket.h); Python's socket module does not export them.
SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27

_ETH_P_IP, _ETH_P_IPV6 = 0x0800, 0x86DD
_VLAN_TPIDS = (0x8100, 0x88A8)
_ETH_HLEN, _VLAN_HLEN = 14, 4
_IP4_DST, _IP6_DST = 16, 24  # offsets of the destination address in the IP header

# One instruction: struct sock_filter {__u16 code; __u8 jt; __u8 jf; __u32 k;}, native order.
_INSN = struct.Struct("=HBBI")

_Insn = tuple[int, int, int, int]


def _stmt(code: int, k: int) -> _Insn:
    return (code, 0, 0, k)


def _jeq(k: int, jt: int, jf: int) -> _Insn:
    return (BPF_JMP | BPF_JEQ | BPF_K, jt, jf, k)


def _ja(offset: int) -> _Insn:
    return (BPF_JMP | BPF_JA, 0, 0, offset)


def _ret(k: int) -> _Insn:
    return (BPF_RET | BPF_K, 0, 0, k)


def _vlan_prologue() -> list[_Insn]:
    """Leave the ethertype in A and the L3 offset in X, after at most two tags in the data.

    Every jump lands on the `dispatch` code that follows (the ethertype checks).
    """
    code: list[_Insn] = []
    for tags in range(3):
        ethertype_at = _ETH_HLEN - 2 + tags * _VLAN_HLEN
        code.append(_stmt(BPF_LD | BPF_H | BPF_ABS, ethertype_at))
        if tags < 2:
            # A tag: go on to the next round (skip the `ldx; ja` pair); else X = L3 offset.
            code.append(_jeq(_VLAN_TPIDS[0], 3, 0))
            code.append(_jeq(_VLAN_TPIDS[1], 2, 0))
        code.append(_stmt(BPF_LDX | BPF_W | BPF_IMM, ethertype_at + 2))
        if tags < 2:
            # Jump to dispatch over the remaining rounds (5 instructions per round with a tag
            # check, 2 for the last one).
            code.append(_ja((1 - tags) * 5 + 2))
    return code


def _match_v4(vips: Sequence[bytes]) -> list[_Insn]:
    code = [_stmt(BPF_LD | BPF_W | BPF_IND, _IP4_DST)]
    for vip in vips:
        (word,) = struct.unpack("!I", vip)
        code += [_jeq(word, 0, 1), _ret(ACCEPT)]
    code.append(_ret(0))
    return code


def _match_v6(vips: Sequence[bytes]) -> list[_Insn]:
    code: list[_Insn] = []
    for vip in vips:
        words = struct.unpack("!4I", vip)
        for i, word in enumerate(words):
            # On a mismatch skip the rest of this VIP: the (3 - i) remaining load+compare pairs
            # and the return.
            code.append(_stmt(BPF_LD | BPF_W | BPF_IND, _IP6_DST + 4 * i))
            code.append(_jeq(word, 0, 2 * (3 - i) + 1))
        code.append(_ret(ACCEPT))
    code.append(_ret(0))
    return code


def vip_filter(vips: Sequence[bytes]) -> bytes:
    """Assemble the filter admitting Ethernet frames whose IPv4/IPv6 destination is in `vips`.

    `vips` are packed addresses (4 or 16 bytes; duplicates are ignored). Admitted frames are
    returned whole (`ACCEPT`), everything else is dropped (0), including frames too short to hold
    the destination address (a classic BPF load beyond the frame ends the program with 0).
    Raises `UsageError` for an address of another length or a program beyond `MAX_INSNS`.
    """
    v4: list[bytes] = []
    v6: list[bytes] = []
    for vip in vips:
        if len(vip) == 4:
            family = v4
        elif len(vip) == 16:
            family = v6
        else:
            raise UsageError(f"VIP address must be 4 or 16 bytes, got {len(vip)}")
        if vip not in family:
            family.append(vip)
    v4_code = _match_v4(v4) if v4 else []
    v6_code = _match_v6(v6) if v6 else []
    if not v4 and not v6:
        return drop_all()
    # dispatch: A = ethertype, X = L3 offset. Each family is reached by a 32-bit `ja`, so the
    # 8-bit conditional offsets never need to span a family's block.
    code = _vlan_prologue()
    code += [
        _jeq(_ETH_P_IP, 0, 1),
        _ja(3) if v4 else _ret(0),  # -> v4 block, after the 3 instructions below
        _jeq(_ETH_P_IPV6, 0, 1),
        _ja(1 + len(v4_code)) if v6 else _ret(0),  # -> v6 block
        _ret(0),
    ]
    code += v4_code + v6_code
    if len(code) > MAX_INSNS:
        raise UsageError(
            f"{len(v4)} IPv4 + {len(v6)} IPv6 VIPs need {len(code)} BPF instructions,"
            f" more than the kernel's {MAX_INSNS}"
        )
    return b"".join(_INSN.pack(*insn) for insn in code)


def drop_all() -> bytes:
    """A program that admits nothing (attach it to a socket that must not queue frames)."""
    return _INSN.pack(*_ret(0))


class _SockFprog(ctypes.Structure):
    """struct sock_fprog {unsigned short len; struct sock_filter *filter;}."""

    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def attach_filter(sock: socket.socket, program: bytes) -> None:
    """Attach classic BPF `program` (bytes of `struct sock_filter[]`) to `sock`.

    Replaces any filter already attached. The kernel validates the program and copies it during
    the call; an invalid one raises `OSError` (EINVAL).
    """
    if not program or len(program) % _INSN.size or len(program) // _INSN.size > MAX_INSNS:
        raise UsageError(f"BPF program of {len(program)} bytes is not 1..{MAX_INSNS} instructions")
    # `setsockopt` gets a copy of `struct sock_fprog`, whose pointer refers to `insns`: the buffer
    # must stay alive until the call returns (the kernel copies the instructions during it).
    insns = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // _INSN.size, ctypes.addressof(insns))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(fprog))
    del insns


def detach_filter(sock: socket.socket) -> None:
    """Remove the filter from `sock` (ENOENT from the kernel if there is none)."""
    sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
