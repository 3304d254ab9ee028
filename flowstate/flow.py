"""The connection 5-tuple, its canonical byte encoding, its 128-bit hash and its Redis key.

Pure functions only: the forwarder (C and Python), the store and the CLI all derive keys here,
so a flow pinned by one POP is found under the same key by every other POP.
"""

from __future__ import annotations

import binascii
import enum
import ipaddress
import struct
from dataclasses import dataclass

import mmh3

from flowstate.errors import UsageError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Seed of the flow hash. Part of the on-wire/key format: changing it re-keys every flow.
HASH_SEED = 0x666C6F77  # "flow"
#: Prefix of every flow key in Redis. Short on purpose: every byte costs memory per flow.
KEY_PREFIX = b"fs1:"
#: Number of Redis Cluster hash slots.
CLUSTER_SLOTS = 16384

_HEADER = struct.Struct("!BBHH")


class Proto(enum.IntEnum):
    """Transport protocols flowstate forwards (IANA protocol numbers)."""

    TCP = 6
    UDP = 17

    @classmethod
    def parse(cls, text: str | int) -> Proto:
        """Accept 'tcp', 'udp', 6 or 17; raise UsageError otherwise."""
        if isinstance(text, int):
            try:
                return cls(text)
            except ValueError:
                raise UsageError(
                    f"unsupported protocol number {text} (want 6=tcp or 17=udp)"
                ) from None
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise UsageError(f"unsupported protocol {text!r} (want tcp or udp)") from None


def _packed(addr: bytes | str | IPAddress, what: str) -> bytes:
    if isinstance(addr, bytes):
        if len(addr) not in (4, 16):
            raise UsageError(f"{what}: packed address must be 4 or 16 bytes, got {len(addr)}")
        return addr
    if isinstance(addr, str):
        try:
            return ipaddress.ip_address(addr).packed
        except ValueError:
            raise UsageError(f"{what}: {addr!r} is not an IPv4 or IPv6 address") from None
    return addr.packed


def _port(value: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0xFFFF:
        raise UsageError(f"{what}: port must be an integer 0..65535, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class FiveTuple:
    """A client→VIP flow as the forwarder sees it on the wire.

    Addresses are kept packed (4 or 16 bytes) because that is what the data path and the key
    schema use; `client` and `vip` give `ipaddress` objects for humans.
    """

    proto: Proto
    client_ip: bytes
    client_port: int
    vip_ip: bytes
    vip_port: int

    @classmethod
    def make(
        cls,
        proto: Proto | str | int,
        client_ip: bytes | str | IPAddress,
        client_port: int,
        vip_ip: bytes | str | IPAddress,
        vip_port: int,
    ) -> FiveTuple:
        """Validate and build a tuple from text, packed bytes or `ipaddress` objects."""
        p = proto if isinstance(proto, Proto) else Proto.parse(proto)
        c = _packed(client_ip, "client address")
        v = _packed(vip_ip, "VIP")
        if len(c) != len(v):
            raise UsageError("client address and VIP must both be IPv4 or both IPv6")
        return cls(p, c, _port(client_port, "client port"), v, _port(vip_port, "VIP port"))

    @property
    def family(self) -> int:
        """4 or 6."""
        return 4 if len(self.client_ip) == 4 else 6

    @property
    def client(self) -> IPAddress:
        return ipaddress.ip_address(self.client_ip)

    @property
    def vip(self) -> IPAddress:
        return ipaddress.ip_address(self.vip_ip)

    def encode(self) -> bytes:
        """Canonical encoding: family, proto, client port, VIP port, client address, VIP address.

        Network byte order, fixed layout (14 bytes for IPv4, 38 for IPv6). The C fast path
        builds the same bytes, so both hash a flow identically.
        """
        return (
            _HEADER.pack(self.family, self.proto, self.client_port, self.vip_port)
            + self.client_ip
            + self.vip_ip
        )

    def digest(self) -> bytes:
        """128-bit MurmurHash3 (x64 variant) of the canonical encoding, 16 bytes."""
        return flow_digest(self.encode())

    def hash64(self) -> int:
        """Low 64 bits of the digest as an unsigned integer: Maglev's and the flow label's input."""
        return int.from_bytes(self.digest()[:8], "little")

    def key(self) -> bytes:
        """This flow's Redis key."""
        return flow_key(self.encode())

    def __str__(self) -> str:
        c, v = self.client, self.vip
        cs = f"[{c}]" if c.version == 6 else str(c)
        vs = f"[{v}]" if v.version == 6 else str(v)
        return f"{self.proto.name.lower()} {cs}:{self.client_port} -> {vs}:{self.vip_port}"


def flow_digest(encoded: bytes) -> bytes:
    """mmh3 x64 128-bit hash of an encoded tuple, as 16 bytes (h1 then h2, little endian)."""
    return bytes(mmh3.hash_bytes(encoded, HASH_SEED, True))


def flow_key(encoded: bytes) -> bytes:
    """Redis key of an encoded tuple: `KEY_PREFIX` + 16-byte digest (20 bytes in all).

    Why this spreads evenly over the 16384 cluster slots: Redis places a key by CRC16 of the
    whole key (there is no `{hash tag}` by construction unless the random digest happens to
    contain one, which `key_slot` honours exactly like Redis). The digest bytes are uniform
    and independent of how clustered the client addresses and ports are, and CRC16 of a
    fixed prefix followed by uniform bytes is itself uniform over its 14 low bits.
    """
    return KEY_PREFIX + flow_digest(encoded)


def key_slot(key: bytes) -> int:
    """Redis Cluster hash slot of a key (CRC16-XMODEM mod 16384, honouring `{hash tags}`)."""
    start = key.find(b"{")
    if start != -1:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return binascii.crc_hqx(key, 0) % CLUSTER_SLOTS
