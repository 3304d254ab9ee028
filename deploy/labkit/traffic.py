"""The lab's clients: many long-lived HTTP keep-alive connections and UDP flows to the VIPs.

`python -m deploy.labkit.traffic ...` runs in the client namespace until SIGTERM, then closes
every connection cleanly and prints one JSON document: a record per connection and per UDP flow,
and when this process itself was paused (not given the CPU; not counted as network silence).
While running it prints a JSON progress line to stderr every half second.
Times are CLOCK_MONOTONIC seconds, the same clock as the lab runner's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import random
import signal
import socket
import sys
import time
from collections.abc import Awaitable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

__all__ = ["FlowResult", "PauseClock", "TrafficOptions", "main", "run"]

T = TypeVar("T")

# How a TCP connection ended. "running" never leaves the process.
COMPLETED, RESET, STALLED, FAILED, RUNNING = "completed", "reset", "stalled", "failed", "running"
# How a UDP flow went: every answer from one backend, answers from several, or a silent gap.
UDP_KEPT, UDP_MOVED = "completed", "moved"


@dataclass
class FlowResult:
    """One TCP connection or UDP flow, as the client saw it."""

    id: int
    kind: str
    """"tcp" or "udp"."""
    family: int
    src: str
    sport: int = 0
    start: float = 0.0
    """When the connect (or the first datagram) started."""
    established: float | None = None
    """When the TCP handshake finished (or the first UDP answer came)."""
    end: float | None = None
    """When it ended (failure or the clean close at the end)."""
    status: str = RUNNING
    error: str | None = None
    requests: int = 0
    """Answers received (HTTP responses or UDP datagrams)."""
    backends: dict[str, int] = field(default_factory=dict)
    """Answers per backend (server name)."""
    switches: int = 0
    """Times the answering backend changed (UDP; a TCP connection cannot change)."""
    last_backend: str = ""
    last_progress: float = 0.0
    max_gap: float = 0.0
    """Longest time without an answer while the flow was running."""
    max_gap_end: float | None = None
    """When that longest silence ended."""


@dataclass(frozen=True)
class TrafficOptions:
    vip4: str
    vip6: str
    http_port: int = 80
    udp_port: int = 53
    conns: int = 200
    udp_flows: int = 20
    interval: float = 0.05
    """Mean time between two requests of one connection (jittered ±50 %)."""
    udp_interval: float = 0.1
    stall: float = 2.0
    """No answer for this long: the connection is stalled (and given up)."""
    sources4: tuple[str, ...] = ()
    sources6: tuple[str, ...] = ()
    ipv6_every: int = 4
    """Every n-th connection/flow uses IPv6 (0: none)."""
    ramp: float = 1.0
    """Seconds over which the connections are opened."""


def _source(opts: TrafficOptions, i: int) -> tuple[int, str, str]:
    """(family, source address, VIP) of connection/flow i."""
    if opts.ipv6_every and opts.sources6 and i % opts.ipv6_every == opts.ipv6_every - 1:
        return 6, opts.sources6[i % len(opts.sources6)], opts.vip6
    return 4, opts.sources4[i % len(opts.sources4)], opts.vip4


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


class PauseClock:
    """When this process's event loop did not run (the machine gave it no CPU).

    A silence the client sat through while it was paused is not the network's: stalls and gaps
    are measured in running time. The pauses are reported, so none of this is hidden.
    """

    def __init__(self, tick: float = 0.02, threshold: float = 0.2) -> None:
        self.tick = tick
        self.threshold = threshold
        self.pauses: list[tuple[float, float]] = []

    async def watch(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.tick)
            now = time.monotonic()
            if now - last > self.tick + self.threshold:
                self.pauses.append((last + self.tick, now))
            last = now

    def running(self, start: float, end: float) -> float:
        """Seconds of [start, end] this process was not paused."""
        paused = sum(max(0.0, min(end, b) - max(start, a)) for a, b in self.pauses[-64:])
        return max(0.0, end - start - paused)

    async def within(self, aw: Awaitable[T], limit: float) -> T:
        """`aw`'s result, or TimeoutError once it took `limit` seconds of running time."""
        task = asyncio.ensure_future(aw)
        start = time.monotonic()
        while True:
            left = limit - self.running(start, time.monotonic())
            if left <= 0:
                task.cancel()
                raise TimeoutError
            done, _ = await asyncio.wait({task}, timeout=left)
            if done:
                return task.result()


def _answered(rec: FlowResult, backend: str, now: float, clock: PauseClock) -> None:
    if rec.last_backend and backend != rec.last_backend:
        rec.switches += 1
    rec.last_backend = backend
    rec.backends[backend] = rec.backends.get(backend, 0) + 1
    rec.requests += 1
    gap = clock.running(rec.last_progress, now) if rec.last_progress else 0.0
    if gap > rec.max_gap:
        rec.max_gap = gap
        rec.max_gap_end = now
    rec.last_progress = now


async def _tcp(
    opts: TrafficOptions, rec: FlowResult, vip: str, stop: asyncio.Event, clock: PauseClock
) -> None:
    host = f"[{vip}]" if ":" in vip else vip
    writer: asyncio.StreamWriter | None = None
    rec.start = time.monotonic()
    try:
        reader, stream = await asyncio.wait_for(
            asyncio.open_connection(vip, opts.http_port, local_addr=(rec.src, 0)), opts.stall * 3
        )
        writer = stream
        rec.sport = int(stream.get_extra_info("sockname")[1])
        rec.established = rec.last_progress = time.monotonic()
        n = 0
        while not stop.is_set():
            if stream.transport.is_closing():
                # A reset that came in while idle (an ACK of ours reached a POP without the
                # socket) has closed the transport already; the reader holds the error.
                raise reader.exception() or ConnectionResetError("closed while idle")
            stream.write(f"GET /{rec.id}/{n} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            head = await clock.within(reader.readuntil(b"\r\n\r\n"), opts.stall)
            body = await clock.within(reader.readexactly(_content_length(head)), opts.stall)
            _answered(rec, str(json.loads(body)["backend"]), time.monotonic(), clock)
            n += 1
            pause = opts.interval * random.uniform(0.5, 1.5)
            if not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), pause)
        rec.status = COMPLETED
    except TimeoutError:
        rec.status = STALLED if rec.established is not None else FAILED
        rec.error = "no answer" if rec.established is not None else "connect timed out"
    except ConnectionResetError:
        rec.status = RESET
        rec.error = "connection reset"
    except asyncio.IncompleteReadError:
        rec.status = RESET
        rec.error = "closed by peer"
    except Exception as exc:  # whatever else went wrong, it ends this connection only
        rec.status = FAILED
        rec.error = f"{type(exc).__name__}: {exc}"
    finally:
        rec.end = time.monotonic()
        if writer is not None:
            if rec.status == COMPLETED:
                writer.close()
            else:
                writer.transport.abort()


class _UdpClient(asyncio.DatagramProtocol):
    def __init__(self, rec: FlowResult, clock: PauseClock) -> None:
        self.rec = rec
        self.clock = clock

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        now = time.monotonic()
        if self.rec.established is None:
            self.rec.established = now
        _answered(self.rec, data.split(b" ", 1)[0].decode(errors="replace"), now, self.clock)


async def _udp(
    opts: TrafficOptions, rec: FlowResult, vip: str, stop: asyncio.Event, clock: PauseClock
) -> None:
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if rec.family == 6 else socket.AF_INET
    rec.start = rec.last_progress = time.monotonic()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _UdpClient(rec, clock),
        local_addr=(rec.src, 0),
        remote_addr=(vip, opts.udp_port),
        family=family,
    )
    rec.sport = int(transport.get_extra_info("sockname")[1])
    n = 0
    try:
        while not stop.is_set():
            transport.sendto(f"{rec.id}/{n}".encode())
            n += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), opts.udp_interval)
        await asyncio.sleep(opts.udp_interval * 3)  # the last answers
    finally:
        transport.close()
        rec.end = time.monotonic()
        tail = clock.running(rec.last_progress, rec.end) - opts.udp_interval * 3
        rec.max_gap = max(rec.max_gap, tail)
        if rec.max_gap >= opts.stall or rec.established is None:
            rec.status = STALLED
        elif len(rec.backends) > 1:
            rec.status = UDP_MOVED
        else:
            rec.status = UDP_KEPT


def _progress(results: list[FlowResult]) -> dict[str, Any]:
    tcp = [r for r in results if r.kind == "tcp"]
    counts: dict[str, Any] = {
        "t": time.monotonic(),
        "established": sum(r.established is not None for r in tcp),
        "alive": sum(r.established is not None and r.end is None for r in tcp),
    }
    for status in (RESET, STALLED, FAILED):
        counts[status] = sum(r.status == status for r in tcp)
    counts["requests"] = sum(r.requests for r in results)
    return counts


async def run(opts: TrafficOptions, stop: asyncio.Event, clock: PauseClock) -> list[FlowResult]:
    """Open every connection and flow, keep them busy until `stop`, close them, report."""
    results: list[FlowResult] = []
    tasks: list[asyncio.Task[None]] = []
    watcher = asyncio.create_task(clock.watch())
    for i in range(opts.conns + opts.udp_flows):
        kind = "tcp" if i < opts.conns else "udp"
        family, src, vip = _source(opts, i)
        rec = FlowResult(id=i, kind=kind, family=family, src=src)
        results.append(rec)
        flow = _tcp if kind == "tcp" else _udp
        tasks.append(asyncio.create_task(flow(opts, rec, vip, stop, clock)))
        if opts.ramp > 0:
            await asyncio.sleep(opts.ramp / (opts.conns + opts.udp_flows))

    async def report() -> None:
        while True:
            print(json.dumps(_progress(results)), file=sys.stderr, flush=True)
            await asyncio.sleep(0.5)

    reporter = asyncio.create_task(report())
    await asyncio.gather(*tasks)
    reporter.cancel()
    watcher.cancel()
    print(json.dumps(_progress(results)), file=sys.stderr, flush=True)
    return results


def _addresses(first: str, count: int) -> tuple[str, ...]:
    start = ipaddress.ip_address(first)
    return tuple(str(start + i) for i in range(count))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.labkit.traffic")
    p.add_argument("--vip4", required=True)
    p.add_argument("--vip6", required=True)
    p.add_argument("--http-port", type=int, default=80)
    p.add_argument("--udp-port", type=int, default=53)
    p.add_argument("--conns", type=int, default=200)
    p.add_argument("--udp-flows", type=int, default=20)
    p.add_argument("--interval", type=float, default=0.05)
    p.add_argument("--udp-interval", type=float, default=0.1)
    p.add_argument("--stall", type=float, default=2.0)
    p.add_argument("--src4", required=True, help="first IPv4 client address")
    p.add_argument("--n4", type=int, default=1, help="IPv4 client addresses from --src4 on")
    p.add_argument("--src6", required=True, help="first IPv6 client address")
    p.add_argument("--n6", type=int, default=1)
    p.add_argument("--ipv6-every", type=int, default=4)
    p.add_argument("--ramp", type=float, default=1.0)
    a = p.parse_args(argv)
    opts = TrafficOptions(
        vip4=a.vip4,
        vip6=a.vip6,
        http_port=a.http_port,
        udp_port=a.udp_port,
        conns=a.conns,
        udp_flows=a.udp_flows,
        interval=a.interval,
        udp_interval=a.udp_interval,
        stall=a.stall,
        sources4=_addresses(a.src4, a.n4),
        sources6=_addresses(a.src6, a.n6),
        ipv6_every=a.ipv6_every,
        ramp=a.ramp,
    )
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass

    clock = PauseClock()

    async def go() -> list[FlowResult]:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await run(opts, stop, clock)

    results = asyncio.run(go())
    json.dump({"flows": [asdict(r) for r in results], "pauses": clock.pauses}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
