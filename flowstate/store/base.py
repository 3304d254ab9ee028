"""The `FlowStore` API shared by the Redis Cluster store and the in-process store.

Every call is batched (one call, many flows) and bounded by a deadline: it either answers
correctly or raises `StoreUnavailable` quickly. Results are positional (item i answers item i).

Lookups may answer part of a batch. A Redis Cluster batch spans several masters; when one of
them cannot answer in time (down, stopped, cut off) the others still can. `lookup_many(...,
partial=True)` returns `LOOKUP_FAILED` for the items that could not be answered and the records
(or None, "not stored") for the others; it raises `StoreUnavailable` only when no item at all
could be answered. Without `partial` (the default, for callers asking about one flow or that
need all answers) any unanswered item raises `StoreUnavailable`, as before. A failed item means
"unknown": it must not be taken for "not stored" (that would write a new pinning over a flow
that may be pinned elsewhere). Writes are never partial: they answer or raise.

With `StoreConfig.read_from_replicas` ("on-failure", the default) the Redis store reads the
slots of a master that failed (connect refused, connection lost, silent for 50 ms while it
owes replies; not a merely late answer) from one of its replicas (READONLY) until the master
answers a probe again (the fast path's; the redis-py reference path reads masters only).
Replicas lag their master by milliseconds: fine for the flows a lookup is for (pinned
earlier, moved here with a route).
"""

from __future__ import annotations

import abc
import enum
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, overload

from flowstate.errors import StoreUnavailable, UsageError
from flowstate.flow import KEY_PREFIX, FiveTuple
from flowstate.record import FlowRecord

#: (tuple, record, ttl_ms) as given to `pin_many`.
PinItem = tuple[FiveTuple, FlowRecord, int]


def check_pin_keys(items: Sequence[PinItem], keys: Sequence[bytes] | None) -> None:
    """`pin_many`'s `keys` must name every item, in order: raise UsageError otherwise."""
    if keys is not None and len(keys) != len(items):
        raise UsageError(f"pin_many: {len(keys)} keys for {len(items)} items")


class LookupFailed(enum.Enum):
    """The type of `LOOKUP_FAILED` (an enum, so that `x is LOOKUP_FAILED` narrows types)."""

    LOOKUP_FAILED = "LOOKUP_FAILED"

    def __repr__(self) -> str:
        return "LOOKUP_FAILED"


#: A `lookup_many(..., partial=True)` item the store could not answer (its master was down or
#: too slow and no replica answered): unknown, not "absent". Compare with `is`.
LOOKUP_FAILED: Final = LookupFailed.LOOKUP_FAILED
#: One item of a partial lookup: the record, None (not stored, or not a valid record) or
#: `LOOKUP_FAILED`.
LookupResult = FlowRecord | LookupFailed | None


class ReplicaReads(enum.StrEnum):
    """Whether lookups read from replicas (`StoreConfig.read_from_replicas`)."""

    OFF = "off"
    """Only masters answer; a master that is down fails its items."""
    ON_FAILURE = "on-failure"
    """A master that failed (connect refused, connection lost, silent) has its slots read
    from one of its replicas until it answers a probe again. Lookups only, never writes."""


@dataclass(frozen=True, slots=True)
class ScanEntry:
    """One key found by `FlowStore.scan`: the record, or why it could not be decoded."""

    key: bytes
    record: FlowRecord | None
    ttl_ms: int | None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """Deadlines and limits of a store client."""

    lookup_deadline_ms: float = 5.0
    """Deadline of `lookup_many` (a forwarder falls back to Maglev past it)."""
    write_deadline_ms: float = 50.0
    """Deadline of `pin_many`, `touch_many`, `release_many` and `delete`."""
    scan_deadline_ms: float = 2000.0
    """Deadline of each SCAN page (inspection only)."""
    connect_timeout_ms: float = 500.0
    """Deadline of connecting and discovering the cluster topology."""
    topology_refresh_ms: float = 1000.0
    """How often the slot map is re-read in the background (0: only after redirections and
    failures). A client that sent nothing to a master while it failed over would otherwise
    learn of it from its next batch, which meets the dead master and fails as a whole."""
    read_from_replicas: ReplicaReads = ReplicaReads.ON_FAILURE
    """Read the slots of a failed master from its replicas (see `ReplicaReads`); a string of
    one of its values is accepted too."""

    def __post_init__(self) -> None:
        try:
            mode = ReplicaReads(self.read_from_replicas)
        except ValueError:
            options = ", ".join(repr(m.value) for m in ReplicaReads)
            raise UsageError(
                f"read_from_replicas: {self.read_from_replicas!r} is not one of {options}"
            ) from None
        object.__setattr__(self, "read_from_replicas", mode)


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """TLS to the Redis nodes, as PEM files (redis-py's cluster client takes files, not an
    `SSLContext`; the store's own connections get the equivalent context)."""

    ca_file: str | None = None
    """CA bundle that verifies the nodes; None for the system's trust store."""
    cert_file: str | None = None
    """Client certificate (with `key_file`) for nodes that ask for one (mutual TLS)."""
    key_file: str | None = None
    check_hostname: bool = True
    """Check that a node's certificate names the address it was reached at (Redis Cluster
    hands out IP addresses: give the nodes IP SANs)."""

    def ssl_context(self) -> ssl.SSLContext:
        """The client context (TLS 1.2 or later); raises OSError/ssl.SSLError on bad files."""
        ctx = ssl.create_default_context(cafile=self.ca_file)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = self.check_hostname
        if self.cert_file is not None:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx

    def redis_py_kwargs(self) -> dict[str, Any]:
        """The same settings as redis-py's `RedisCluster` keyword arguments."""
        return {
            "ssl": True,
            "ssl_ca_certs": self.ca_file,
            "ssl_certfile": self.cert_file,
            "ssl_keyfile": self.key_file,
            "ssl_cert_reqs": "required",
            "ssl_check_hostname": self.check_hostname,
            "ssl_min_version": ssl.TLSVersion.TLSv1_2,
        }


class FlowStore(abc.ABC):
    """Connection pinnings keyed by 5-tuple. Implementations: RedisClusterStore, MemoryStore."""

    @abc.abstractmethod
    async def pin_many(
        self,
        items: Sequence[PinItem],
        *,
        deadline_ms: float | None = None,
        keys: Sequence[bytes] | None = None,
    ) -> list[FlowRecord]:
        """SET NX PX each record; return the record actually stored for each item.

        Where a valid record already exists it is returned and left alone (the caller adopts
        it: a SYN retransmit that reached another POP first). An existing value that is not a
        valid record is overwritten with the caller's record, which is then returned.

        `keys`, if given, is each item's `FiveTuple.key()`, already computed (the forwarder's
        engine computes them in C): the store uses them instead of hashing the tuples.
        """

    @overload
    async def lookup_many(
        self,
        tuples: Sequence[FiveTuple],
        *,
        deadline_ms: float | None = None,
        partial: Literal[False] = False,
    ) -> list[FlowRecord | None]: ...

    @overload
    async def lookup_many(
        self,
        tuples: Sequence[FiveTuple],
        *,
        deadline_ms: float | None = None,
        partial: Literal[True],
    ) -> list[LookupResult]: ...

    async def lookup_many(
        self,
        tuples: Sequence[FiveTuple],
        *,
        deadline_ms: float | None = None,
        partial: bool = False,
    ) -> list[Any]:
        """GET each flow; None where absent or where the stored bytes are not a valid record.

        With `partial`, items the store could not answer are `LOOKUP_FAILED` and
        `StoreUnavailable` is raised only if no item could be answered; without it, any
        unanswered item raises `StoreUnavailable` (see the module docstring).
        """
        results, why = await self._lookup(tuples, deadline_ms)
        if why is not None and (not partial or all(r is LOOKUP_FAILED for r in results)):
            raise StoreUnavailable(why)
        return results

    @abc.abstractmethod
    async def _lookup(
        self, tuples: Sequence[FiveTuple], deadline_ms: float | None
    ) -> tuple[list[LookupResult], str | None]:
        """Each item's answer (`LOOKUP_FAILED` where unanswered) and, if any item failed, why
        (the first reason). Raises `StoreUnavailable` only when it cannot even try."""

    @abc.abstractmethod
    async def touch_many(
        self, items: Sequence[tuple[FiveTuple, int]], *, deadline_ms: float | None = None
    ) -> list[bool]:
        """Set each flow's TTL to ttl_ms (refresh); True where the flow existed."""

    @abc.abstractmethod
    async def release_many(
        self, tuples: Sequence[FiveTuple], linger_ms: int, *, deadline_ms: float | None = None
    ) -> list[bool]:
        """Shorten each flow's TTL to linger_ms (never lengthen it); True where it existed."""

    @abc.abstractmethod
    async def delete(self, tuples: Sequence[FiveTuple], *, deadline_ms: float | None = None) -> int:
        """Delete flows; return how many existed."""

    @abc.abstractmethod
    def scan(
        self, match: bytes = KEY_PREFIX + b"*", *, count: int = 1000
    ) -> AsyncIterator[ScanEntry]:
        """Iterate over stored flows (all masters, cursor-based, bounded memory)."""

    @abc.abstractmethod
    async def ttl_ms(self, t: FiveTuple) -> int | None:
        """Remaining TTL of one flow in ms, None if absent."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections."""

    async def __aenter__(self) -> FlowStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
