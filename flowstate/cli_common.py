"""Pieces the `flowstate` subcommands share: options, parsing of operator input, formatting.

Everything here is pure (no I/O beyond reading a password file or a config file when asked),
so the unit tests exercise it directly.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NoReturn

from flowstate.control_client import DEFAULT_SOCKET
from flowstate.errors import ConfigError, UsageError
from flowstate.flow import FiveTuple

if TYPE_CHECKING:
    from flowstate.store.redis_cluster import RedisClusterStore
    from forwarder.config import ForwarderConfig

#: Environment variables read when the matching option is not given.
ENV_SEEDS = "FLOWSTATE_REDIS_SEEDS"
ENV_PASSWORD = "FLOWSTATE_REDIS_PASSWORD"

#: Exit codes: success, the operation failed (unreachable, not found), bad input.
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class CommandFailed(Exception):
    """A command could not do its job for a reason outside the caller's input (exit 1)."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`prog: error: ...`) instead of usage + error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


# --- options -------------------------------------------------------------------------------------


def json_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="machine-readable output: one JSON document (or one per line for lists)",
    )


def socket_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--socket",
        metavar="PATH",
        type=Path,
        default=None,
        help=f"control socket of the forwarder (default {DEFAULT_SOCKET})",
    )


def cluster_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster connection")
    g.add_argument(
        "--seeds",
        metavar="HOST:PORT,...",
        help=f"some Redis Cluster nodes (default ${ENV_SEEDS}, else the --config file's seeds)",
    )
    g.add_argument(
        "--password-file",
        metavar="FILE",
        type=Path,
        help=f"file holding the Redis password (default ${ENV_PASSWORD}, else --config's)",
    )
    g.add_argument("--username", metavar="USER", help="Redis ACL user (default: the default user)")


def config_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--config", metavar="FILE", type=Path, default=None, help=what)


def five_tuple_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("client_ip", metavar="CLIENT-IP", help="client address (IPv4 or IPv6)")
    p.add_argument("client_port", metavar="CLIENT-PORT", type=port_number, help="client port")
    p.add_argument("vip", metavar="VIP", help="the VIP (service address)")
    p.add_argument("vip_port", metavar="VIP-PORT", type=port_number, help="the VIP's port")
    p.add_argument(
        "proto", metavar="tcp|udp", nargs="?", default="tcp", help="protocol (default tcp)"
    )


def port_number(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 0xFFFF:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0..65535)")
    return int(text)


def five_tuple(args: argparse.Namespace) -> FiveTuple:
    """The flow named by the positional arguments; UsageError on a bad address or protocol."""
    return FiveTuple.make(args.proto, args.client_ip, args.client_port, args.vip, args.vip_port)


def wants_json(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False))


def control_socket(args: argparse.Namespace) -> Path:
    sock: Path | None = getattr(args, "socket", None)
    return sock if sock is not None else DEFAULT_SOCKET


# --- cluster settings ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    seeds: tuple[tuple[str, int], ...]
    password: str | None
    username: str | None


def parse_seeds(text: str, where: str = "--seeds") -> tuple[tuple[str, int], ...]:
    """``host:port,[v6]:port,...`` → ((host, port), ...); UsageError naming `where`."""
    seeds: list[tuple[str, int]] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise UsageError(f"{where}: {host!r} is not an IPv6 address") from None
        elif ":" in host:
            raise UsageError(f"{where}: write IPv6 seeds in brackets: [{host}]:{port}")
        if not sep or not host or not port.isdigit() or not 0 < int(port) <= 0xFFFF:
            raise UsageError(f"{where}: {item!r} is not host:port")
        seeds.append((host, int(port)))
    if not seeds:
        raise UsageError(f"{where}: no seed given (want host:port,...)")
    return tuple(seeds)


def read_password_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise UsageError(f"--password-file: cannot read {path}: {reason}") from None
    value = text.removesuffix("\n").removesuffix("\r")
    if not value or "\n" in value:
        raise UsageError(f"--password-file: {path} must hold the password on one line")
    return value


def cluster_settings(
    args: argparse.Namespace,
    config: ForwarderConfig | None = None,
    environ: Mapping[str, str] | None = None,
) -> ClusterSettings | None:
    """Where the store is: options, then the environment, then the forwarder config; None if
    nothing says."""
    env = os.environ if environ is None else environ
    seeds: tuple[tuple[str, int], ...] = ()
    if getattr(args, "seeds", None):
        seeds = parse_seeds(args.seeds)
    elif env.get(ENV_SEEDS, "").strip():
        seeds = parse_seeds(env[ENV_SEEDS], f"${ENV_SEEDS}")
    elif config is not None and config.store.seeds:
        seeds = tuple((e.host, e.port) for e in config.store.seeds)
    if not seeds:
        return None
    password: str | None = None
    if getattr(args, "password_file", None) is not None:
        password = read_password_file(args.password_file)
    elif env.get(ENV_PASSWORD):
        password = env[ENV_PASSWORD]
    elif config is not None:
        try:
            secret = config.store.read_password(env)
        except ConfigError as exc:
            raise UsageError(f"--config: {exc}") from None
        password = secret.reveal() if secret is not None else None
    username = getattr(args, "username", None)
    if username is None and config is not None:
        username = config.store.username
    return ClusterSettings(seeds, password, username)


async def connect_store(settings: ClusterSettings) -> RedisClusterStore:
    """Connect for inspection: generous deadlines (an operator waits, a packet does not)."""
    from flowstate.store import StoreConfig
    from flowstate.store.redis_cluster import RedisClusterStore

    return await RedisClusterStore.connect(
        list(settings.seeds),
        password=settings.password,
        username=settings.username,
        config=StoreConfig(
            lookup_deadline_ms=2000,
            write_deadline_ms=2000,
            scan_deadline_ms=5000,
            connect_timeout_ms=3000,
        ),
    )


def load_forwarder_config(path: Path | None) -> ForwarderConfig | None:
    if path is None:
        return None
    from forwarder.config import load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        raise UsageError(f"--config: {exc}") from None


# --- formatting ----------------------------------------------------------------------------------


def duration(ms: float | None) -> str:
    """Milliseconds for humans: ``850 ms``, ``12.3 s``, ``4 min 05 s``, ``2 h 03 min``."""
    if ms is None:
        return "-"
    if ms < 0:
        return "-" + duration(-ms)
    if ms < 1000:
        return f"{ms:.0f} ms"
    s = ms / 1000
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(s), 60)
    if m < 60:
        return f"{m} min {sec:02d} s"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h} h {m:02d} min"
    d, h = divmod(h, 24)
    return f"{d} d {h:02d} h"


def seconds(value: float | None) -> str:
    """A latency in seconds for humans: ``0.42 ms``, ``12 ms``, ``1.2 s``."""
    if value is None:
        return "-"
    if value < 0.01:
        return f"{value * 1000:.2f} ms"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    return f"{value:.1f} s"


def rate(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.2f} M/s"
    if value >= 1e4:
        return f"{value / 1e3:.1f} k/s"
    return f"{value:.1f}/s"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns, two spaces apart, no trailing blanks."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [list(headers), *rows]:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def emit_json(obj: Any, out: IO[str] | None = None) -> None:
    """One JSON document on one line."""
    stream = sys.stdout if out is None else out
    stream.write(json.dumps(obj, sort_keys=False) + "\n")
