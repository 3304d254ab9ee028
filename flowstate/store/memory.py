"""In-process `FlowStore`: the embedded default for a single POP and for unit tests of logic.

Same semantics as the Redis Cluster store (NX pins, TTLs in ms, strict decoding), with a
bounded number of entries and an injectable clock so TTL tests are deterministic.
"""

from __future__ import annotations

import fnmatch
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence

from flowstate.errors import RecordError, UsageError
from flowstate.flow import KEY_PREFIX, FiveTuple
from flowstate.record import FlowRecord, decode_record
from flowstate.store.base import (
    LOOKUP_FAILED,
    FlowStore,
    LookupResult,
    PinItem,
    ScanEntry,
    check_pin_keys,
)


def _monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


class MemoryStore(FlowStore):
    """A dict of key → (encoded record, expiry ms), evicting the oldest past `max_entries`."""

    def __init__(
        self, *, max_entries: int = 1_000_000, clock: Callable[[], int] = _monotonic_ms
    ) -> None:
        if max_entries < 1:
            raise UsageError("max_entries must be >= 1")
        self._data: OrderedDict[bytes, tuple[bytes, int]] = OrderedDict()
        self._max = max_entries
        self._clock = clock
        self.evictions = 0
        self.unreachable: Callable[[FiveTuple], bool] | None = None
        """Fault injection (tests): lookups of the flows it returns True for fail as if their
        Redis master were down (`LOOKUP_FAILED`; see `FlowStore.lookup_many`)."""

    def __len__(self) -> int:
        return len(self._data)

    def _get(self, key: bytes, now: int) -> bytes | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry[1] <= now:
            del self._data[key]
            return None
        return entry[0]

    def _set(self, key: bytes, value: bytes, expires: int) -> None:
        self._data[key] = (value, expires)
        self._data.move_to_end(key)
        while len(self._data) > self._max:
            self._data.popitem(last=False)
            self.evictions += 1

    def put_raw(self, key: bytes, value: bytes, ttl_ms: int) -> None:
        """Store raw bytes under a key (tests use it to plant garbage records)."""
        self._set(key, value, self._clock() + ttl_ms)

    async def pin_many(
        self,
        items: Sequence[PinItem],
        *,
        deadline_ms: float | None = None,
        keys: Sequence[bytes] | None = None,
    ) -> list[FlowRecord]:
        now = self._clock()
        out: list[FlowRecord] = []
        check_pin_keys(items, keys)
        for i, (t, rec, ttl) in enumerate(items):
            _check_ttl(ttl)
            key = t.key() if keys is None else keys[i]
            existing = self._get(key, now)
            if existing is not None:
                try:
                    out.append(decode_record(existing))
                    continue
                except RecordError:
                    pass
            self._set(key, rec.encode(), now + ttl)
            out.append(rec)
        return out

    async def _lookup(
        self, tuples: Sequence[FiveTuple], deadline_ms: float | None
    ) -> tuple[list[LookupResult], str | None]:
        now = self._clock()
        out: list[LookupResult] = []
        unreachable = self.unreachable
        why = None
        for t in tuples:
            if unreachable is not None and unreachable(t):
                out.append(LOOKUP_FAILED)
                why = "unreachable (fault injected)"
                continue
            raw = self._get(t.key(), now)
            try:
                out.append(None if raw is None else decode_record(raw))
            except RecordError:
                out.append(None)
        return out, why

    async def touch_many(
        self, items: Sequence[tuple[FiveTuple, int]], *, deadline_ms: float | None = None
    ) -> list[bool]:
        now = self._clock()
        out = []
        for t, ttl in items:
            _check_ttl(ttl)
            key = t.key()
            raw = self._get(key, now)
            if raw is not None:
                self._data[key] = (raw, now + ttl)
            out.append(raw is not None)
        return out

    async def release_many(
        self, tuples: Sequence[FiveTuple], linger_ms: int, *, deadline_ms: float | None = None
    ) -> list[bool]:
        _check_ttl(linger_ms)
        now = self._clock()
        out = []
        for t in tuples:
            key = t.key()
            raw = self._get(key, now)
            if raw is not None:
                self._data[key] = (raw, min(self._data[key][1], now + linger_ms))
            out.append(raw is not None)
        return out

    async def delete(self, tuples: Sequence[FiveTuple], *, deadline_ms: float | None = None) -> int:
        now = self._clock()
        n = 0
        for t in tuples:
            key = t.key()
            if self._get(key, now) is not None:
                del self._data[key]
                n += 1
        return n

    async def scan(
        self, match: bytes = KEY_PREFIX + b"*", *, count: int = 1000
    ) -> AsyncIterator[ScanEntry]:
        now = self._clock()
        pattern = match.decode("latin-1")
        for key in list(self._data):
            raw = self._get(key, now)
            if raw is None or not fnmatch.fnmatchcase(key.decode("latin-1"), pattern):
                continue
            expires = self._data[key][1]
            try:
                yield ScanEntry(key, decode_record(raw), expires - now)
            except RecordError as exc:
                yield ScanEntry(key, None, expires - now, str(exc))

    async def ttl_ms(self, t: FiveTuple) -> int | None:
        now = self._clock()
        key = t.key()
        if self._get(key, now) is None:
            return None
        return self._data[key][1] - now

    async def close(self) -> None:
        return None


def _check_ttl(ttl: int) -> None:
    if type(ttl) is not int or ttl <= 0:
        raise UsageError(f"TTL must be a positive integer of ms, got {ttl!r}")
