"""The flow record stored per pinned connection, and its msgpack codec.

Decoding is strict: a record is either fully valid or `RecordError` is raised, because a
forwarder acts on it (a bad backend address would send a client's packets somewhere wrong).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import msgpack

from flowstate.errors import RecordError, UsageError

#: Current record format version; decoders reject any other.
RECORD_VERSION = 1
#: Longest POP id accepted (bytes of UTF-8).
MAX_POP_LEN = 32
_MAX_MS = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class FlowRecord:
    """Where a flow is pinned: backend (IPv6 unicast, 16 bytes packed), VIP (4 or 16 bytes),
    creation time (Unix ms), the POP id that pinned it, and the format version."""

    backend_ip: bytes
    vip_ip: bytes
    created_ms: int
    pop: str
    version: int = RECORD_VERSION

    @classmethod
    def make(
        cls,
        backend: bytes | str | ipaddress.IPv6Address,
        vip: bytes | str | ipaddress.IPv4Address | ipaddress.IPv6Address,
        created_ms: int,
        pop: str,
    ) -> FlowRecord:
        """Build a record from text or packed addresses; raise UsageError on bad values."""
        try:
            b = backend if isinstance(backend, bytes) else ipaddress.IPv6Address(backend).packed
            v = vip if isinstance(vip, bytes) else ipaddress.ip_address(vip).packed
        except ValueError as exc:
            raise UsageError(f"bad record address: {exc}") from None
        rec = cls(b, v, created_ms, pop)
        problem = _problem(rec)
        if problem:
            raise UsageError(f"bad record: {problem}")
        return rec

    @property
    def backend(self) -> ipaddress.IPv6Address:
        return ipaddress.IPv6Address(self.backend_ip)

    @property
    def vip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.ip_address(self.vip_ip)

    def encode(self) -> bytes:
        """msgpack array `[version, backend, vip, created_ms, pop]` (about 40 bytes)."""
        data: bytes = msgpack.packb(
            [self.version, self.backend_ip, self.vip_ip, self.created_ms, self.pop],
            use_bin_type=True,
        )
        return data


def _problem(rec: FlowRecord) -> str | None:
    if rec.version != RECORD_VERSION:
        return f"unsupported record version {rec.version!r} (want {RECORD_VERSION})"
    if type(rec.backend_ip) is not bytes or len(rec.backend_ip) != 16:
        return "backend must be a 16-byte IPv6 address"
    if type(rec.vip_ip) is not bytes or len(rec.vip_ip) not in (4, 16):
        return "vip must be a 4- or 16-byte address"
    if type(rec.created_ms) is not int or not 0 <= rec.created_ms <= _MAX_MS:
        return "created_ms must be an integer in 0..2**63-1"
    if type(rec.pop) is not str or not rec.pop or len(rec.pop.encode()) > MAX_POP_LEN:
        return f"pop must be a non-empty string of at most {MAX_POP_LEN} bytes"
    return None


def decode_record(data: bytes) -> FlowRecord:
    """Decode and validate stored bytes; raise RecordError on anything but a valid record."""
    try:
        obj = msgpack.unpackb(data, raw=False, use_list=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise RecordError(f"record is not valid msgpack: {type(exc).__name__}") from None
    if type(obj) is not tuple or len(obj) != 5:
        raise RecordError("record must be a 5-element array")
    version, backend, vip, created, pop = obj
    if version != RECORD_VERSION or type(version) is not int:
        raise RecordError(f"unsupported record version {version!r} (want {RECORD_VERSION})")
    rec = FlowRecord(backend, vip, created, pop, version)
    problem = _problem(rec)
    if problem:
        raise RecordError(problem)
    return rec
