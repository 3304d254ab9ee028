"""Programs the end-to-end tests run inside namespaces: backend servers, clients, store queries.

`python -m tests.e2e.tools SUBCOMMAND ...`; clients print one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import threading
import time
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def serve_http(name: str, binds: list[str], port: int) -> None:
    """HTTP/1.1 keep-alive server on each VIP; every response names this backend."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            body = json.dumps({"backend": name, "client": self.client_address[:2]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class V6Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6

    servers: list[ThreadingHTTPServer] = []
    for addr in binds:
        cls = V6Server if ":" in addr else ThreadingHTTPServer
        cls.daemon_threads = True
        cls.request_queue_size = 256
        servers.append(cls((addr, port), Handler))
    for server in servers[1:]:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print("ready", flush=True)
    servers[0].serve_forever()


def serve_udp(name: str, binds: list[str], port: int) -> None:
    """Answer every datagram with this backend's name."""
    socks = []
    for addr in binds:
        s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((addr, port))
        socks.append(s)

    def loop(s: socket.socket) -> None:
        while True:
            data, peer = s.recvfrom(2048)
            s.sendto(json.dumps({"backend": name, "echo": data.decode()}).encode(), peer)

    for s in socks[1:]:
        threading.Thread(target=loop, args=(s,), daemon=True).start()
    print("ready", flush=True)
    loop(socks[0])


def http_clients(
    vip: str, port: int, conns: int, requests: int, interval: float, timeout: float
) -> list[dict[str, Any]]:
    """`conns` keep-alive connections in parallel, each making `requests` GETs `interval` apart.

    Per connection: local port, the backend of every response, and how it ended.
    """
    results: list[dict[str, Any]] = [{} for _ in range(conns)]

    def one(i: int) -> None:
        out: dict[str, Any] = {"port": None, "backends": [], "error": None}
        results[i] = out
        conn = HTTPConnection(vip, port, timeout=timeout)
        try:
            conn.connect()
            assert conn.sock is not None
            out["port"] = conn.sock.getsockname()[1]
            for n in range(requests):
                if n:
                    time.sleep(interval)
                conn.request("GET", f"/{i}/{n}")
                resp = conn.getresponse()
                out["backends"].append(json.loads(resp.read())["backend"])
        except ConnectionResetError:
            out["error"] = "reset"
        except TimeoutError:
            out["error"] = "stalled"
        except Exception as exc:
            out["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            conn.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(conns)]
    for t in threads:
        t.start()
        time.sleep(0.002)  # a SYN burst larger than the listen backlog is not the test
    for t in threads:
        t.join()
    return results


def udp_clients(vip: str, port: int, flows: int, datagrams: int) -> list[dict[str, Any]]:
    """Each flow (its own socket) sends `datagrams` requests and records who answered."""
    family = socket.AF_INET6 if ":" in vip else socket.AF_INET
    out = []
    for i in range(flows):
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.settimeout(2.0)
        s.connect((vip, port))
        rec: dict[str, Any] = {"port": s.getsockname()[1], "backends": [], "error": None}
        for n in range(datagrams):
            s.send(f"{i}/{n}".encode())
            try:
                rec["backends"].append(json.loads(s.recv(2048))["backend"])
            except TimeoutError:
                rec["error"] = "timeout"
                break
        s.close()
        out.append(rec)
    return out


async def _records(seeds: str, password: str, flows: list[list[Any]]) -> list[str | None]:
    from flowstate.flow import FiveTuple
    from flowstate.store.redis_cluster import RedisClusterStore

    pairs = [(h, int(p)) for h, p in (s.rsplit(":", 1) for s in seeds.split(","))]
    store = await RedisClusterStore.connect(pairs, password=password)
    try:
        tuples = [FiveTuple.make(*f) for f in flows]
        recs = await store.lookup_many(tuples, deadline_ms=5000)
        return [None if r is None else str(r.backend) for r in recs]
    finally:
        await store.close()


def main() -> None:
    p = argparse.ArgumentParser(prog="tests.e2e.tools")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("serve-http", "serve-udp"):
        s = sub.add_parser(name)
        s.add_argument("--name", required=True)
        s.add_argument("--bind", action="append", required=True)
        s.add_argument("--port", type=int, required=True)
    h = sub.add_parser("http-clients")
    h.add_argument("--vip", required=True)
    h.add_argument("--port", type=int, default=80)
    h.add_argument("--conns", type=int, default=10)
    h.add_argument("--requests", type=int, default=1)
    h.add_argument("--interval", type=float, default=0.0)
    h.add_argument("--timeout", type=float, default=5.0)
    u = sub.add_parser("udp-clients")
    u.add_argument("--vip", required=True)
    u.add_argument("--port", type=int, default=53)
    u.add_argument("--flows", type=int, default=10)
    u.add_argument("--datagrams", type=int, default=3)
    r = sub.add_parser("records")
    r.add_argument("--seeds", required=True)
    r.add_argument("--password", required=True)
    r.add_argument("--flows", required=True, help="JSON list of [proto, client, port, vip, port]")
    a = p.parse_args()
    if a.cmd == "serve-http":
        serve_http(a.name, a.bind, a.port)
    elif a.cmd == "serve-udp":
        serve_udp(a.name, a.bind, a.port)
    elif a.cmd == "http-clients":
        res = http_clients(a.vip, a.port, a.conns, a.requests, a.interval, a.timeout)
        json.dump(res, sys.stdout)
    elif a.cmd == "udp-clients":
        json.dump(udp_clients(a.vip, a.port, a.flows, a.datagrams), sys.stdout)
    elif a.cmd == "records":
        json.dump(asyncio.run(_records(a.seeds, a.password, json.loads(a.flows))), sys.stdout)


if __name__ == "__main__":
    main()
