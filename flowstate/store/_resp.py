"""One pipelined RESP2 connection to one Redis node: the Redis store's fast path.

`RespConnection` is an asyncio `Protocol`: under uvloop it moved ~10% more raw GETs/s than
asyncio streams with the same hiredis parsing (1.01M vs 0.92M/s, six 512-GET batches in
flight on 3 masters): no StreamReader buffer copy, replies parsed in `data_received`. A caller
writes a whole group of commands with one `send(payload, n)` and gets a future of the `n`
replies, parsed by one `hiredis.Reader` per connection. Requests are answered in order
(FIFO), so any number of callers may pipeline on the same connection concurrently.

A caller that gives up waiting (its deadline passed) does not put the stream out of sync:
its entry stays in the FIFO and its replies are parsed and dropped when they come. A
connection whose stream may be out of sync (a protocol error, a reply nobody asked for) or
that has stalled (see `stalled`) is aborted at once and never reused; every waiter on it
then fails with `ConnectionError`.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Any, cast

import hiredis


def pack_command(*args: bytes | str | int) -> bytes:
    """RESP encoding of one command (hiredis does it in C)."""
    data: bytes = hiredis.pack_command(cast(Any, args))
    return data


#: hiredis returns error replies as instances of this class (it does not raise them).
HiredisReplyError: type[Exception] = hiredis.ReplyError


#: Bytes fed to the hiredis reader at a time (see `RespConnection.data_received`).
_FEED_CHUNK = 4096


class _Pending:
    __slots__ = ("fut", "n", "replies", "sent_at")

    def __init__(self, fut: asyncio.Future[list[Any]], n: int, sent_at: float) -> None:
        self.fut = fut
        self.n = n
        self.sent_at = sent_at
        self.replies: list[Any] = []


class RespConnection(asyncio.Protocol):
    """A pipelined connection: `send()` commands, await their replies in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str) -> None:
        self.loop = loop
        self.name = name
        self._reader = hiredis.Reader()
        self._waiting: deque[_Pending] = deque()
        self._transport: asyncio.Transport | None = None
        self.alive = False
        self._lost: asyncio.Future[None] = loop.create_future()
        self._out: list[bytes] = []
        self.last_rx = 0.0
        #: Replies sent for and not received yet (including those of callers who gave up).
        self.owed = 0
        self._flush_scheduled = False

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.alive = True
        self.last_rx = self.loop.time()

    def data_received(self, data: bytes) -> None:
        self.last_rx = self.loop.time()
        # Fed in slices: hiredis compacts its buffer (memmove of all unread bytes) each time
        # 1 KiB of it has been parsed, so one large feed costs O(n^2) with many replies in
        # flight (measured: 3-4x slower lookups with six 512-item batches pipelined).
        feed = self._reader.feed
        size = len(data)
        try:
            if size <= _FEED_CHUNK:
                feed(data)
                self._drain()
            else:
                for offset in range(0, size, _FEED_CHUNK):
                    feed(data, offset, min(_FEED_CHUNK, size - offset))
                    self._drain()
        except hiredis.ProtocolError as exc:
            self.abort(f"{self.name}: protocol error: {exc}")

    def _drain(self) -> None:
        """Hand every complete reply to its waiter, in order."""
        waiting = self._waiting
        gets = self._reader.gets
        while waiting:
            p = waiting[0]
            replies = p.replies
            missing = p.n - len(replies)
            append = replies.append
            while missing:
                r = gets()
                if r is False:
                    return
                append(r)
                missing -= 1
            waiting.popleft()
            self.owed -= p.n
            if not p.fut.done():
                p.fut.set_result(replies)
        if self.alive and gets() is not False:
            self.abort(f"{self.name}: reply nobody asked for")

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all(f"{self.name}: connection lost" + (f": {exc}" if exc else ""))
        if not self._lost.done():
            self._lost.set_result(None)

    # -- API -------------------------------------------------------------------------------

    def send(self, payload: bytes, n: int) -> asyncio.Future[list[Any]]:
        """Queue `n` packed commands; the future gets their `n` replies, in order.

        Writes are coalesced: everything sent during one event-loop step goes out in one
        `write` at the end of the step (many concurrent small batches → one syscall).
        """
        fut: asyncio.Future[list[Any]] = self.loop.create_future()
        if not self.alive:
            fut.set_exception(ConnectionError(f"{self.name}: connection closed"))
            return fut
        self._waiting.append(_Pending(fut, n, self.loop.time()))
        self.owed += n
        self._out.append(payload)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self._flush_scheduled = False
        out = self._out
        if not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        if self.alive and self._transport is not None:
            self._transport.write(data)

    @property
    def in_flight(self) -> int:
        return len(self._waiting)

    def stalled(self, now: float, quiet_s: float, max_owed: int) -> bool:
        """True if replies are owed and nothing at all arrived for `quiet_s` seconds since
        the oldest of them was sent (the node or the path to it has stopped), or if more
        than `max_owed` replies are owed (it answers far slower than it is asked)."""
        if not self._waiting:
            return False
        if self.owed > max_owed:
            return True
        return now - max(self.last_rx, self._waiting[0].sent_at) > quiet_s

    def abort(self, why: str) -> None:
        """Drop the connection now (its reply stream can no longer be trusted)."""
        self.alive = False
        if self._transport is not None:
            self._transport.abort()
        self._fail_all(why)

    async def aclose(self) -> None:
        """Close and wait until the transport is gone (no unclosed-transport warnings)."""
        self.alive = False
        self._fail_all(f"{self.name}: closed")
        if self._transport is not None:
            self._transport.close()
            if not self._lost.done():
                try:
                    await asyncio.wait_for(asyncio.shield(self._lost), 1.0)
                except TimeoutError:
                    self._transport.abort()

    def _fail_all(self, why: str) -> None:
        self.alive = False
        waiting = self._waiting
        while waiting:
            p = waiting.popleft()
            if not p.fut.done():
                p.fut.set_exception(ConnectionError(why))
                # Mark retrieved: the caller may already have given up on this future.
                p.fut.exception()


async def open_connection(
    host: str,
    port: int,
    *,
    timeout: float,
    password: str | None,
    username: str | None,
    ssl_context: ssl.SSLContext | None = None,
) -> RespConnection:
    """Connect (and AUTH) within `timeout` seconds; raise OSError/TimeoutError/ConnectionError."""
    loop = asyncio.get_running_loop()
    name = f"{host}:{port}"
    proto = RespConnection(loop, name)
    async with asyncio.timeout(timeout):
        try:
            await loop.create_connection(lambda: proto, host, port, ssl=ssl_context)
            if password is not None:
                args: tuple[str, ...] = (
                    ("AUTH", username, password) if username else ("AUTH", password)
                )
                (reply,) = await proto.send(pack_command(*args), 1)
                if isinstance(reply, HiredisReplyError):
                    raise ConnectionError(f"{name}: AUTH failed: {reply}")
        except BaseException:
            proto.abort(f"{name}: connect failed")
            raise
    return proto
