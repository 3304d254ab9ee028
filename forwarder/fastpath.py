"""The data path's one public module: verdict/event codes, `Result`, and the engine loader.

`load_engine("c")` is the C fast path (`forwarder._fastpath`), `load_engine("python")` the pure
Python reference (`forwarder.pyengine`); both implement `Engine` as forwarder/DATAPATH.md says.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Protocol, cast

from flowstate.errors import UsageError
from forwarder.packet import REPLY, TP_STATUS_CSUMNOTREADY, Event, Verdict
from forwarder.pyengine import Engine as PyEngine
from forwarder.pyengine import FlowT, Result, flow_hash64

__all__ = [
    "IMPLS",
    "REPLY",
    "TP_STATUS_CSUMNOTREADY",
    "Engine",
    "Event",
    "FlowT",
    "Result",
    "Verdict",
    "c_engine_available",
    "flow_hash64",
    "load_engine",
]

#: Accepted values of `load_engine`'s `impl` (and of the forwarder's `datapath.impl` setting).
IMPLS = ("c", "python")


class Engine(Protocol):
    """The data-path engine interface; get a class from `load_engine` (DATAPATH.md)."""

    entry_size: int

    def __init__(
        self,
        *,
        source_ipv6: bytes,
        capacity: int,
        tcp_idle_ms: int,
        udp_idle_ms: int,
        fin_linger_ms: int,
        touch_interval_ms: int,
        tunnel_mtu: int = 1500,
    ) -> None: ...

    def set_vip(
        self, vip_id: int, ip: bytes, port: int, proto: int, *, udp_lookup_first: bool = False
    ) -> None: ...

    def remove_vip(self, vip_id: int) -> int: ...

    def set_backend(
        self,
        backend_id: int,
        ip: bytes,
        *,
        dst_mac: bytes = b"",
        src_mac: bytes = b"",
        ifindex: int = 0,
        mtu: int = 0,
    ) -> None: ...

    def remove_backend(self, backend_id: int) -> int: ...

    def set_maglev(self, vip_id: int, table: bytes) -> None: ...

    def process(
        self, frames: Sequence[bytes], now_ms: int, statuses: Sequence[int] | None = None
    ) -> Result: ...

    def forward_to(self, frames: Sequence[bytes], backend_id: int) -> Result: ...

    def install(self, flow: FlowT, backend_id: int, now_ms: int) -> None: ...

    def lookup(self, flow: FlowT) -> tuple[int, int, int] | None: ...

    def maglev_pick(self, vip_id: int, hash64: int) -> int: ...

    def expire(self, now_ms: int, budget: int) -> list[FlowT]: ...

    def counters(self) -> dict[str, int]: ...

    def __len__(self) -> int: ...


def _c_engine() -> object | None:
    try:
        module = importlib.import_module("forwarder._fastpath")
    except ImportError:
        return None
    return getattr(module, "Engine", None)


def c_engine_available() -> bool:
    """True when the C extension is built and provides `Engine`."""
    return _c_engine() is not None


def load_engine(impl: str) -> type[Engine]:
    """The engine class for `impl` ("c" or "python").

    Raises UsageError for another name, ImportError when "c" is asked for but the extension is
    not built (or is an older build without `Engine`): rebuild with `pip install -e .`.
    """
    if impl == "python":
        return PyEngine
    if impl == "c":
        engine = _c_engine()
        if engine is None:
            raise ImportError(
                "the C data path (forwarder._fastpath.Engine) is not built; "
                "run `pip install -e .` or choose impl='python'"
            )
        # The extension's class implements the same interface (checked by the golden tests).
        return cast("type[Engine]", engine)
    raise UsageError(f"unknown data path impl {impl!r} (want one of {', '.join(IMPLS)})")
