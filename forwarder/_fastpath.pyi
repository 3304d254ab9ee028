"""Types of the C fast path (forwarder/DATAPATH.md); import it through `forwarder.fastpath`."""

from collections.abc import Sequence
from types import TracebackType
from typing import Final, Protocol, final, type_check_only

from forwarder.pyengine import Result as EngineResult

FlowT = tuple[int, bytes, int, bytes, int]

ABI_VERSION: Final[int]
REPLY: Final[int]
ENTRY_SIZE: Final[int]
MAX_CAPACITY: Final[int]
ICMP_BUDGET: Final[int]
VERDICTS: Final[dict[str, int]]

MissT = tuple[int, FlowT, bytes, int]

@final
class Result(tuple[bytes, list[tuple[int, bytes]], list[MissT], list[tuple[int, FlowT, int]]]):
    @property
    def verdicts(self) -> bytes: ...
    @property
    def tx(self) -> list[tuple[int, bytes]]: ...
    @property
    def misses(self) -> list[MissT]: ...
    @property
    def events(self) -> list[tuple[int, FlowT, int]]: ...

@type_check_only
class EngineAPI(Protocol):
    """The data-path engine interface of both engines (DATAPATH.md), stated once: it is
    `forwarder.fastpath.Engine` for type checkers, and the C `Engine` below derives from it.
    Parameters before a `/` are positional-only, as the C methods take them. Only in this stub:
    the C module has no such name.
    """

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
    def remove_vip(self, vip_id: int, /) -> int: ...
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
    def remove_backend(self, backend_id: int, /) -> int: ...
    def set_maglev(self, vip_id: int, table: bytes, /) -> None: ...
    def process(
        self, frames: Sequence[bytes], now_ms: int, statuses: Sequence[int] | None = None
    ) -> EngineResult: ...
    def forward_to(self, frames: Sequence[bytes], backend_id: int) -> EngineResult: ...
    def install(self, flow: FlowT, backend_id: int, now_ms: int) -> None: ...
    def lookup(self, flow: FlowT, /) -> tuple[int, int, int] | None: ...
    def flow_keys(self, flows: Sequence[FlowT], /) -> list[bytes]: ...
    def maglev_pick(self, vip_id: int, hash64: int, /) -> int: ...
    def expire(self, now_ms: int, budget: int) -> list[FlowT]: ...
    def counters(self) -> dict[str, int]: ...
    def __len__(self) -> int: ...

@final
class Engine(EngineAPI):
    """The C engine: everything of `EngineAPI`, plus `capacity` and `backend_link`."""

    entry_size: int  # (a protocol's attribute without a value has to be restated)

    @property
    def capacity(self) -> int: ...
    def backend_link(self, backend_id: int, /) -> tuple[int, bytes, bytes, int] | None: ...

@final
class PacketRing:
    @property
    def ifindex(self) -> int: ...
    @property
    def ifname(self) -> str: ...
    @property
    def closed(self) -> bool: ...
    def __init__(
        self,
        ifname: str,
        *,
        fanout_group: int = 0,
        block_size: int = 1 << 20,
        block_count: int = 64,
        frame_size: int = 2048,
        bpf: bytes = b"",
        block_timeout_ms: int = 1,
    ) -> None: ...
    def run(self, engine: Engine, now_ms: int, max_frames: int, timeout_ms: int = 0) -> Result: ...
    def send(self, tx: Sequence[tuple[int, bytes]], engine: Engine | None = None) -> int: ...
    def fileno(self) -> int: ...
    def close(self) -> None: ...
    def counters(self) -> dict[str, int]: ...
    def __enter__(self) -> PacketRing: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

def hash_bytes(data: bytes, seed: int = 0, /) -> bytes: ...
def group_by_node(
    keys: Sequence[bytes], slot_node: Sequence[int], n_nodes: int, /
) -> list[list[int]]: ...
