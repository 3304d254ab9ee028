"""Network-namespace topologies for the lab and end-to-end tests: namespaces, veths, processes.

A `Topology` deletes every namespace it made and ends every process started in them on exit,
also on failure. Needs root and iproute2; `netns_unavailable()` says why not.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType

__all__ = [
    "NETNS_PREFIX",
    "Netns",
    "NetnsError",
    "Topology",
    "Veth",
    "netns_unavailable",
    "remove_stale_namespaces",
    "wait_until",
]

NETNS_PREFIX = f"fs-t{os.getpid()}-"
"""Every namespace made by this process starts with this (fs-t<pid>-)."""

_CLONE_NEWNET = 0x40000000
_RUN_NETNS = "/run/netns"
_ETC_NETNS = "/etc/netns"  # `ip netns exec` bind-mounts /etc/netns/<name>/* over /etc/*
_RESOLV_CONF = (
    "# flowstate test namespace: no name server, lookups fail at once\nnameserver 127.0.0.1\n"
)
_STALE_NAME = re.compile(r"^fs-t(\d+)-")
_counter = itertools.count(1)

Command = Sequence[str] | str


class NetnsError(RuntimeError):
    """A namespace command failed; the message carries the command, its exit code and stderr."""


def netns_unavailable() -> str | None:
    """Why namespaces cannot be used here (not root, no iproute2, ...), or None if they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed"
    probe = f"{NETNS_PREFIX}probe{next(_counter)}"
    try:
        added = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
        if added.returncode != 0:
            return f"'ip netns add' failed: {added.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def remove_stale_namespaces() -> list[str]:
    """Delete fs-t<pid>- namespaces whose creating process is gone (a crashed earlier run)."""
    removed: list[str] = []
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir(_RUN_NETNS)):
            match = _STALE_NAME.match(name)
            if match is None or os.path.exists(f"/proc/{match.group(1)}"):
                continue
            _kill_namespace_pids(name)
            if subprocess.run(["ip", "netns", "del", name], capture_output=True).returncode == 0:
                removed.append(name)
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(_ETC_NETNS):
            match = _STALE_NAME.match(name)
            if match is not None and not os.path.exists(f"/proc/{match.group(1)}"):
                shutil.rmtree(f"{_ETC_NETNS}/{name}", ignore_errors=True)
    return removed


def wait_until(
    predicate: Callable[[], object], timeout: float = 5.0, interval: float = 0.05
) -> bool:
    """Poll `predicate()` until it is true or `timeout` seconds pass; returns whether it was."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def _argv(cmd: Command) -> list[str]:
    return ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)


def _check(cmd: Sequence[str], result: subprocess.CompletedProcess[str]) -> None:
    if result.returncode != 0:
        raise NetnsError(
            f"{' '.join(cmd)!r} exited {result.returncode}\n"
            f"stdout: {result.stdout.strip()}\nstderr: {result.stderr.strip()}"
        )


def _host(cmd: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)
    if check:
        _check(cmd, result)
    return result


def _kill_namespace_pids(name: str) -> None:
    # Every process in a namespace of ours was started by this test run (or its children).
    listed = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    for pid in (int(p) for p in listed.stdout.split() if p.isdigit()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if int(_libc.setns(fd, _CLONE_NEWNET)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@dataclass
class Netns:
    """One network namespace. Commands run in it with `ip netns exec`."""

    name: str
    role: str = ""
    processes: list[subprocess.Popen[str]] = field(default_factory=list)

    def run(
        self,
        cmd: Command,
        *,
        check: bool = True,
        timeout: float = 60.0,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command (argv list, or a string for `sh -c`) here and wait; text output."""
        argv = ["ip", "netns", "exec", self.name, *_argv(cmd)]
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            env=None if env is None else {**os.environ, **env},
        )
        if check:
            _check(argv, result)
        return result

    def popen(
        self,
        cmd: Command,
        *,
        env: Mapping[str, str] | None = None,
        stdout: int | None = subprocess.PIPE,
        stderr: int | None = subprocess.PIPE,
    ) -> subprocess.Popen[str]:
        """Start a command here in its own process group; `stop()`/`delete()` end it."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.name, *_argv(cmd)],
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            text=True,
            start_new_session=True,
            env=None if env is None else {**os.environ, **env},
        )
        self.processes.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[str], timeout: float = 3.0) -> None:
        """End a process started by `popen` (SIGTERM to its group, SIGKILL after `timeout`)."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout)
        with contextlib.suppress(ValueError):
            self.processes.remove(proc)

    def ip(self, *args: str) -> str:
        """`ip -n <ns> ARGS`; returns stdout."""
        return _host(["ip", "-n", self.name, *args]).stdout

    def sysctl(self, key: str) -> str:
        return self.run(["sysctl", "-n", key]).stdout.strip()

    def set_sysctl(self, key: str, value: str | int) -> None:
        self.run(["sysctl", "-qw", f"{key}={value}"])

    def add_address(self, dev: str, cidr: str) -> None:
        """Add an address; IPv6 ones skip duplicate address detection (usable at once)."""
        extra = ["nodad"] if ":" in cidr else []
        self.ip("addr", "add", cidr, "dev", dev, *extra)

    def add_route(self, dest: str, via: str | None = None, *options: str) -> None:
        family = "-6" if ":" in dest or (via is not None and ":" in via) else "-4"
        self.ip(family, "route", "add", dest, *(["via", via] if via else []), *options)

    def enable_forwarding(self, ipv4: bool = True, ipv6: bool = True) -> None:
        if ipv4:
            self.set_sysctl("net.ipv4.ip_forward", 1)
        if ipv6:
            self.set_sysctl("net.ipv6.conf.all.forwarding", 1)

    def disable_offloads(
        self, dev: str, features: Sequence[str] = ("gro", "lro", "tso", "gso", "tx", "rx")
    ) -> None:
        """`ethtool -K DEV F off` for each feature; fixed features (veth's lro) are skipped.

        `tx off` makes the sender finish L4 checksums itself: otherwise frames cross a veth with
        a partial checksum (CHECKSUM_PARTIAL) and AF_PACKET readers see TP_STATUS_CSUMNOTREADY.
        """
        for feature in features:
            result = self.run(["ethtool", "-K", dev, feature, "off"], check=False)
            if result.returncode != 0 and "fixed" not in result.stderr + result.stdout:
                _check(["ethtool", "-K", dev, feature, "off"], result)

    def ifindex(self, dev: str) -> int:
        return int(self.run(["cat", f"/sys/class/net/{dev}/ifindex"]).stdout)

    def link_stat(self, dev: str, counter: str) -> int:
        """A counter of /sys/class/net/DEV/statistics, e.g. rx_packets."""
        return int(self.run(["cat", f"/sys/class/net/{dev}/statistics/{counter}"]).stdout)

    def snmp(self) -> dict[str, int]:
        """Kernel protocol counters by their nstat names: UdpInCsumErrors, Ip6InNoRoutes, ..."""
        text = self.run(["cat", "/proc/net/snmp", "/proc/net/snmp6", "/proc/net/netstat"]).stdout
        return _parse_snmp(text)

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Switch the calling thread into this namespace for the block.

        Sockets made inside stay in this namespace after the block; other threads are unaffected.
        """
        with (
            open("/proc/thread-self/ns/net", "rb") as home,
            open(f"{_RUN_NETNS}/{self.name}", "rb") as target,
        ):
            _setns(target.fileno())
            try:
                yield
            finally:
                _setns(home.fileno())

    def socket(self, family: int, kind: int, proto: int = 0) -> socket.socket:
        """A socket that lives in this namespace."""
        with self.entered():
            return socket.socket(family, kind, proto)

    def stop_all(self) -> None:
        for proc in list(self.processes):
            self.stop(proc)
        _kill_namespace_pids(self.name)

    def delete(self) -> None:
        """End every process in the namespace, then delete it (idempotent)."""
        self.stop_all()
        if os.path.exists(f"{_RUN_NETNS}/{self.name}"):
            _host(["ip", "netns", "del", self.name])
        shutil.rmtree(f"{_ETC_NETNS}/{self.name}", ignore_errors=True)


def _parse_snmp(text: str) -> dict[str, int]:
    counters: dict[str, int] = {}
    lines = text.splitlines()
    for index, line in enumerate(lines):
        words = line.split()
        if len(words) == 2 and words[1].lstrip("-").isdigit() and not words[0].endswith(":"):
            counters[words[0]] = int(words[1])  # snmp6: "Udp6InCsumErrors 0"
        elif words and words[0].endswith(":") and index + 1 < len(lines):
            values = lines[index + 1].split()
            if values[:1] == words[:1] and not words[1].lstrip("-").isdigit():
                prefix = words[0][:-1]
                for name, value in zip(words[1:], values[1:], strict=False):
                    counters[prefix + name] = int(value)
    return counters


@dataclass(frozen=True)
class Veth:
    """A veth pair: `a_dev` in `a`, `b_dev` in `b`."""

    a: Netns
    a_dev: str
    b: Netns
    b_dev: str


class Topology:
    """Context manager owning namespaces, links and processes; `close()` removes them all."""

    def __init__(self, tag: str = "") -> None:
        self.tag = tag
        self.namespaces: list[Netns] = []
        self._closed = False

    def add_netns(self, role: str) -> Netns:
        """Create a namespace named fs-t<pid>-<n>-<role>, with lo up."""
        if not re.fullmatch(r"[a-z0-9]{1,16}", role):
            raise ValueError(f"role must be 1-16 of [a-z0-9], got {role!r}")
        name = f"{NETNS_PREFIX}{next(_counter)}-{role}"
        _host(["ip", "netns", "add", name])
        ns = Netns(name=name, role=role)
        # Name lookups (http.server's getfqdn, ...) must not wait on a resolver outside the lab.
        os.makedirs(f"{_ETC_NETNS}/{name}", exist_ok=True)
        with open(f"{_ETC_NETNS}/{name}/resolv.conf", "w") as resolv:
            resolv.write(_RESOLV_CONF)
        self.namespaces.append(ns)
        ns.ip("link", "set", "lo", "up")
        # No duplicate address detection: addresses are usable at once, tests need no waits.
        ns.set_sysctl("net.ipv6.conf.all.accept_dad", 0)
        ns.set_sysctl("net.ipv6.conf.default.accept_dad", 0)
        return ns

    def veth(
        self,
        a: Netns,
        a_dev: str,
        b: Netns,
        b_dev: str,
        *,
        a_addrs: Sequence[str] = (),
        b_addrs: Sequence[str] = (),
        mtu: int | None = None,
    ) -> Veth:
        """Link two namespaces with a veth pair, add addresses (CIDR), bring both ends up."""
        mtu_args = ["mtu", str(mtu)] if mtu else []
        _host(
            [
                *("ip", "link", "add", a_dev, "netns", a.name, *mtu_args, "type", "veth"),
                *("peer", "name", b_dev, "netns", b.name, *mtu_args),
            ]
        )
        for ns, dev, addrs in ((a, a_dev, a_addrs), (b, b_dev, b_addrs)):
            for cidr in addrs:
                ns.add_address(dev, cidr)
            ns.ip("link", "set", dev, "up")
        return Veth(a, a_dev, b, b_dev)

    def settle(self, timeout: float = 10.0) -> None:
        """Wait until every link is up and no IPv6 address is tentative (DAD, link-locals)."""

        def settled(ns: Netns) -> bool:
            links = ns.ip("-o", "link", "show")
            return "NO-CARRIER" not in links and not ns.ip("-6", "addr", "show", "tentative")

        for ns in self.namespaces:
            if not wait_until(functools.partial(settled, ns), timeout):
                raise NetnsError(f"{ns.name}: links or IPv6 addresses did not settle")

    def close(self) -> None:
        """End all processes, delete all namespaces; every step is tried even if one fails."""
        if self._closed:
            return
        self._closed = True
        errors: list[BaseException] = []
        for ns in reversed(self.namespaces):
            try:
                ns.delete()
            except Exception as exc:  # keep tearing down the rest
                errors.append(exc)
        if errors:
            raise NetnsError(f"tear-down failed: {errors}")

    def __enter__(self) -> Topology:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
