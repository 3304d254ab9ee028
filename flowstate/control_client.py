"""Client of a running forwarder's control API (a JSON-lines protocol on a Unix socket).

The protocol, one JSON object per line in each direction, requests answered in order:

    → {"id": 1, "method": "backends", "params": {"vip": {"address": "192.0.2.10"}}}
    ← {"id": 1, "result": {...}}                          (or)
    ← {"id": 1, "error": {"code": "unknown_vip", "message": "..."}}

Methods: `ping`, `stats`, `flow`, `backends`, `drain`, `undrain`, `weight` (see
forwarder/control.py). `VipSelector` is shared by the CLI and the server.
The supervisor's BGP announcer answers `bgp`, `drain_pop` and `undrain_pop` the same way on
``<socket>.bgp`` (forwarder/bgp.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypedDict

from flowstate.errors import FlowstateError, UsageError
from flowstate.flow import FiveTuple, Proto

#: Where the forwarder listens unless its config says otherwise.
DEFAULT_SOCKET = Path("/run/flowstate/forwarder.sock")
#: Longest request or response line accepted (a `stats` answer of many workers is the largest).
MAX_LINE = 4 << 20


class ControlError(FlowstateError):
    """The forwarder answered a request with an error; `code` says which kind."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ControlUnavailable(ControlError):
    """No forwarder answers on the socket (absent, refused, no permission, timed out)."""

    def __init__(self, message: str) -> None:
        super().__init__("unavailable", message)


# --- VIP selection -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VipSelector:
    """Which VIP(s) a command means: an address, optionally narrowed to a port and protocol."""

    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int | None = None
    proto: Proto | None = None

    @classmethod
    def parse(cls, text: str) -> VipSelector:
        """Accept ``ADDR``, ``ADDR:PORT``, ``[V6]:PORT``, each optionally with ``/tcp`` or
        ``/udp`` appended or ``tcp ``/``udp `` in front (as `backends ls` prints VIPs)."""
        raw = text.strip()
        proto: Proto | None = None
        head, _, rest = raw.partition(" ")
        if rest and head.lower() in ("tcp", "udp"):
            proto, raw = Proto.parse(head), rest.strip()
        if "/" in raw:
            raw, _, p = raw.rpartition("/")
            proto = Proto.parse(p)
        port: int | None = None
        host = raw
        if raw.startswith("["):
            host, sep, tail = raw[1:].partition("]")
            if not sep:
                raise UsageError(f"VIP {text!r}: missing ']' after the IPv6 address")
            if tail:
                if not tail.startswith(":"):
                    raise UsageError(f"VIP {text!r}: expected ':PORT' after ']'")
                port = _port(tail[1:], text)
        elif raw.count(":") == 1:
            host, _, p = raw.partition(":")
            port = _port(p, text)
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise UsageError(f"VIP {text!r}: {host!r} is not an IPv4 or IPv6 address") from None
        return cls(address, port, proto)

    def matches(self, address: bytes, port: int, proto: int) -> bool:
        """Whether a VIP (packed address, port, IANA protocol number) is selected."""
        return (
            address == self.address.packed
            and (self.port is None or self.port == port)
            and (self.proto is None or int(self.proto) == proto)
        )

    def to_params(self) -> dict[str, Any]:
        return {
            "address": str(self.address),
            "port": self.port,
            "proto": None if self.proto is None else self.proto.name.lower(),
        }

    @classmethod
    def from_params(cls, params: object) -> VipSelector:
        if not isinstance(params, dict) or not isinstance(params.get("address"), str):
            raise UsageError("vip must be an object with an 'address'")
        port, proto = params.get("port"), params.get("proto")
        if port is not None and (type(port) is not int or not 0 < port <= 0xFFFF):
            raise UsageError(f"vip port must be 1..65535, got {port!r}")
        if proto is not None and not isinstance(proto, str):
            raise UsageError(f"vip proto must be 'tcp' or 'udp', got {proto!r}")
        try:
            address = ipaddress.ip_address(params["address"])
        except ValueError:
            raise UsageError(f"{params['address']!r} is not an IP address") from None
        return cls(address, port, None if proto is None else Proto.parse(proto))

    def __str__(self) -> str:
        a = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        text = f"{a}:{self.port}" if self.port is not None else str(self.address)
        return f"{self.proto.name.lower()} {text}" if self.proto is not None else text


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) <= 0xFFFF:
        raise UsageError(f"VIP {whole!r}: {text!r} is not a port (1..65535)")
    return int(text)


# --- answers -------------------------------------------------------------------------------------


class BackendInfo(TypedDict):
    address: str
    weight: int
    state: str
    """``active`` or ``draining`` (now, after runtime changes)."""
    healthy: bool | None
    """None while no health checks run."""
    slots: int
    """Maglev table slots the backend owns now (its share of new flows)."""
    configured_weight: int
    configured_state: str


class VipInfo(TypedDict):
    vip: str
    address: str
    port: int
    protocol: str
    maglev_size: int
    backends: list[BackendInfo]


class BackendsAnswer(TypedDict):
    pop: str
    worker: int
    vips: list[VipInfo]


class ChangeAnswer(TypedDict):
    changed: list[dict[str, Any]]
    """One entry per (VIP, backend) whose weight or state changed: vip, backend, weight, state."""
    workers: list[int]
    """Workers that applied the change."""
    errors: list[dict[str, Any]]
    """Workers that could not be reached or refused: worker, message."""


# --- the client ----------------------------------------------------------------------------------


class ControlClient:
    """One connection to a forwarder's control socket: `await ControlClient.connect(path)`."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: Path, timeout: float
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.path = path
        self.timeout = timeout
        self._ids = itertools.count(1)

    @classmethod
    async def connect(cls, path: str | os.PathLike[str], *, timeout: float = 3.0) -> ControlClient:
        """Connect; raise ControlUnavailable (one readable sentence) if nobody answers."""
        p = Path(path)
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(str(p), limit=MAX_LINE)
        except FileNotFoundError:
            raise ControlUnavailable(f"no forwarder control socket at {p}") from None
        except ConnectionRefusedError:
            raise ControlUnavailable(f"no forwarder listens on {p} (stale socket)") from None
        except PermissionError:
            raise ControlUnavailable(
                f"no permission to open {p} (it is mode 0600: root?)"
            ) from None
        except TimeoutError:
            raise ControlUnavailable(f"{p}: connect timed out after {timeout:g} s") from None
        except OSError as exc:
            raise ControlUnavailable(f"cannot connect to {p}: {exc.strerror or exc}") from None
        return cls(reader, writer, p, timeout)

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Send one request and return its `result`; raise ControlError on an error answer."""
        rid = next(self._ids)
        line = json.dumps({"id": rid, "method": method, "params": params or {}}) + "\n"
        try:
            async with asyncio.timeout(self.timeout):
                self._writer.write(line.encode())
                await self._writer.drain()
                raw = await self._reader.readline()
        except TimeoutError:
            raise ControlUnavailable(
                f"{self.path}: no answer to {method!r} within {self.timeout:g} s"
            ) from None
        except (OSError, ValueError) as exc:  # ValueError: line longer than MAX_LINE
            raise ControlUnavailable(f"{self.path}: {method!r} failed: {exc}") from None
        if not raw:
            raise ControlUnavailable(f"{self.path}: the forwarder closed the connection")
        try:
            answer = json.loads(raw)
        except ValueError:
            raise ControlError("bad_answer", f"{self.path}: answer is not JSON") from None
        if not isinstance(answer, dict) or answer.get("id") != rid:
            raise ControlError("bad_answer", f"{self.path}: answer does not match the request")
        error = answer.get("error")
        if error is not None:
            if not isinstance(error, dict):
                raise ControlError("bad_answer", f"{self.path}: malformed error answer")
            raise ControlError(str(error.get("code", "error")), str(error.get("message", error)))
        return answer.get("result")

    # ---- typed helpers -------------------------------------------------------------------

    async def ping(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("ping")
        return result

    async def stats(self) -> dict[str, Any]:
        """Counters of every worker: ``{"pop", "workers": [...], "errors": [...]}``."""
        result: dict[str, Any] = await self.call("stats")
        return result

    async def flow(self, t: FiveTuple) -> dict[str, Any]:
        """The forwarder's view of one flow: local entry, Maglev now, its store's record."""
        result: dict[str, Any] = await self.call("flow", flow_params(t))
        return result

    async def backends(self, vip: VipSelector | None = None) -> BackendsAnswer:
        params = {"vip": vip.to_params()} if vip is not None else {}
        result: BackendsAnswer = await self.call("backends", params)
        return result

    async def drain(self, backend: str, vip: VipSelector | None = None) -> ChangeAnswer:
        result: ChangeAnswer = await self.call("drain", _change(backend, vip))
        return result

    async def undrain(self, backend: str, vip: VipSelector | None = None) -> ChangeAnswer:
        result: ChangeAnswer = await self.call("undrain", _change(backend, vip))
        return result

    async def set_weight(
        self, backend: str, weight: int, vip: VipSelector | None = None
    ) -> ChangeAnswer:
        result: ChangeAnswer = await self.call(
            "weight", {**_change(backend, vip), "weight": weight}
        )
        return result

    # ---- lifecycle -----------------------------------------------------------------------

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    async def __aenter__(self) -> ControlClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def flow_params(t: FiveTuple) -> dict[str, Any]:
    """A 5-tuple as request parameters (text addresses)."""
    return {
        "proto": t.proto.name.lower(),
        "client_ip": str(t.client),
        "client_port": t.client_port,
        "vip_ip": str(t.vip),
        "vip_port": t.vip_port,
    }


def _change(backend: str, vip: VipSelector | None) -> dict[str, Any]:
    return {"backend": backend, "vip": None if vip is None else vip.to_params()}
