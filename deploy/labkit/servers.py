"""The lab's service: an HTTP/1.1 keep-alive server and a UDP echo on the VIPs, naming itself.

`python -m deploy.labkit.servers --name b1 --bind 192.0.2.10 --bind 2001:db8:f::10` runs in a
backend (or, in naive mode, a POP) namespace and prints "ready" once every socket listens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import sys
from typing import cast

__all__ = ["main", "serve"]

MAX_HEADER = 8192


async def _http_connection(
    name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Answer GETs until the client closes; every body says which server answered."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if len(head) > MAX_HEADER:
                break
            path = head.split(b" ", 2)[1].decode("latin-1") if head.count(b" ") >= 2 else "/"
            body = json.dumps({"backend": name, "path": path}).encode()
            closing = b"connection: close" in head.lower()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n".encode()
                + (b"Connection: close\r\n" if closing else b"")
                + b"\r\n"
                + body
            )
            await writer.drain()
            if closing:
                break
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    except asyncio.CancelledError:
        return  # shutting down: the connection is closed below, nothing to report
    finally:
        writer.close()


class _UdpEcho(asyncio.DatagramProtocol):
    def __init__(self, name: str) -> None:
        self.name = name.encode()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDP transport does not subclass asyncio.DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if self.transport is not None:
            self.transport.sendto(self.name + b" " + data[:256], addr)


async def serve(name: str, binds: list[str], http_port: int, udp_port: int) -> None:
    """Listen on every address until SIGTERM/SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    servers = []
    transports = []
    for addr in binds:
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        servers.append(
            await asyncio.start_server(
                lambda r, w: _http_connection(name, r, w),
                addr,
                http_port,
                family=family,
                backlog=1024,
                reuse_address=True,
            )
        )
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UdpEcho(name), local_addr=(addr, udp_port), family=family
        )
        transports.append(transport)
    print("ready", flush=True)
    await stop.wait()
    for server in servers:
        server.close()
    for transport in transports:
        transport.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.labkit.servers")
    p.add_argument("--name", required=True, help="what every answer says it came from")
    p.add_argument("--bind", action="append", required=True, help="address (repeatable)")
    p.add_argument("--http-port", type=int, default=80)
    p.add_argument("--udp-port", type=int, default=53)
    args = p.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args.name, args.bind, args.http_port, args.udp_port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
