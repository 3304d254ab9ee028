"""Backend health checks: a TCP connect or an HTTP GET per backend, with rise/fall hysteresis.

Each worker checks every distinct target (check address, port) every `interval_ms`. What the
checks decide goes live through the same path as `flowstate backends drain` (`control.replan`):
a backend that is down gets no new flows at once; flows pinned to it keep going to it until it
has been down for `repin_after_ms`, and then move to a healthy backend (their local entries are
dropped, their next packet is looked up, and the record naming the dead backend is replaced).

Backends start healthy: a forwarder that starts while the checks fail (a firewall change, the
check port moved) forwards as before until `fall` checks in a row have failed. Where every
active backend of a VIP is down the checks are ignored for that VIP (`plan_engine` fails open).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from forwarder.config import BackendState, ForwarderConfig, HealthConfig, HealthKind

if TYPE_CHECKING:
    from forwarder.service import BackendKey, Forwarder

log = logging.getLogger("flowstate.forwarder")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: Longest status line an HTTP check reads.
MAX_STATUS_LINE = 1024


@dataclass(frozen=True, slots=True)
class Target:
    """What one check connects to."""

    address: IPAddress
    port: int

    def __str__(self) -> str:
        a = self.address
        return f"[{a}]:{self.port}" if a.version == 6 else f"{a}:{self.port}"


class Status(enum.StrEnum):
    HEALTHY = "healthy"
    DOWN = "down"
    """No new flows; pinned flows continue (the re-pin grace)."""
    DEAD = "dead"
    """Down for `repin_after_ms`: pinned flows move as well."""


class Hysteresis:
    """The rise/fall state machine of one target. Pure: results and the clock come in."""

    __slots__ = ("fall", "repin_after_ms", "rise", "since_ms", "status", "streak")

    def __init__(self, rise: int, fall: int, repin_after_ms: int, now_ms: int) -> None:
        self.rise = rise
        self.fall = fall
        self.repin_after_ms = repin_after_ms
        self.status = Status.HEALTHY
        self.streak = 0
        """Consecutive results against the current status (failures while healthy,
        successes while down)."""
        self.since_ms = now_ms
        """When `status` began (start-up counts as healthy since then)."""

    def observe(self, ok: bool, now_ms: int) -> Status | None:
        """Take one check result; returns the new status if it changed."""
        if self.status is Status.HEALTHY:
            if ok:
                self.streak = 0
                return None
            self.streak += 1
            if self.streak < self.fall:
                return None
            new = Status.DEAD if self.repin_after_ms == 0 else Status.DOWN
            return self._become(new, now_ms)
        if ok:
            self.streak += 1
            return self._become(Status.HEALTHY, now_ms) if self.streak >= self.rise else None
        self.streak = 0
        if self.status is Status.DOWN and now_ms - self.since_ms >= self.repin_after_ms:
            self.status = Status.DEAD  # `since_ms` stays: the outage began when it went down
            return Status.DEAD
        return None

    def _become(self, status: Status, now_ms: int) -> Status:
        self.status, self.streak, self.since_ms = status, 0, now_ms
        return status


def targets_of(config: ForwarderConfig) -> dict[BackendKey, Target]:
    """The check target of every (VIP, backend); empty when checks are off."""
    health = config.health
    if health.kind is HealthKind.NONE:
        return {}
    out: dict[BackendKey, Target] = {}
    for v in config.vips:
        key = (v.address.packed, v.port, int(v.protocol))
        port = health.port if health.port is not None else v.port
        for b in v.backends:
            out[(key, b.address.packed)] = Target(b.check_target, port)
    return out


# --- probes --------------------------------------------------------------------------------------

#: A check: None when it passed, else why it failed (one short phrase for the log).
Probe = Callable[[Target], Awaitable[str | None]]


async def check_tcp(target: Target) -> str | None:
    """Passes when a TCP connection to the target is accepted."""
    _reader, writer = await asyncio.open_connection(str(target.address), target.port)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return None


async def check_http(target: Target, path: str) -> str | None:
    """Passes on a 2xx or 3xx answer to ``GET path`` (HTTP/1.0, connection closed after)."""
    reader, writer = await asyncio.open_connection(
        str(target.address), target.port, limit=MAX_STATUS_LINE
    )
    try:
        writer.write(
            f"GET {path} HTTP/1.0\r\nHost: {target}\r\nUser-Agent: flowstate-health\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        await writer.drain()
        try:
            line = await reader.readline()
        except ValueError:
            line = b"(a line longer than %d bytes)" % MAX_STATUS_LINE
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        shown = line[:60].decode("latin-1").strip() or "nothing"
        return f"not an HTTP answer: {shown!r}"
    code = int(parts[1])
    return None if 200 <= code < 400 else f"HTTP {code}"


def _probe_of(health: HealthConfig) -> Probe:
    if health.kind is HealthKind.HTTP:
        path = health.path
        return lambda target: check_http(target, path)
    return check_tcp


# --- the monitor ---------------------------------------------------------------------------------


def _monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


class HealthMonitor:
    """Checks the targets of one config and keeps their state; `run()` drives it.

    `record()` is the whole decision (tests call it with their own clock); `run()` only adds
    the timers and probes, and calls `apply` after changes (several changes, one call).
    """

    def __init__(
        self,
        config: ForwarderConfig,
        *,
        probe: Probe | None = None,
        clock: Callable[[], int] = _monotonic_ms,
    ) -> None:
        self._probe_override = probe
        self._clock = clock
        self.health = config.health
        self._targets: dict[BackendKey, Target] = {}
        self._states: dict[Target, Hysteresis] = {}
        self._names: dict[Target, list[str]] = {}
        self._tasks: dict[Target, asyncio.Task[None]] = {}
        self._running = False
        self._changed = asyncio.Event()
        self.configure(config)

    # ---- configuration -------------------------------------------------------------------

    def configure(self, config: ForwarderConfig) -> None:
        """Take a (reloaded) config. Targets still checked the same way keep their state; new
        ones start healthy."""
        old, health = self.health, config.health
        if (old.kind, old.path) != (health.kind, health.path):
            self._states.clear()  # another kind of check: what the old one saw does not count
        self.health = health
        self._targets = targets_of(config)
        names: dict[Target, list[str]] = {}
        for (_vip, ip), target in self._targets.items():
            name = str(ipaddress.IPv6Address(ip))
            if name not in names.setdefault(target, []):
                names[target].append(name)
        self._names = names
        now = self._clock()
        states: dict[Target, Hysteresis] = {}
        for target in names:
            state = self._states.get(target) or Hysteresis(
                health.rise, health.fall, health.repin_after, now
            )
            state.rise, state.fall = health.rise, health.fall
            state.repin_after_ms = health.repin_after
            states[target] = state
        self._states = states
        for target in [t for t in self._tasks if t not in states]:
            self._tasks.pop(target).cancel()
        if self._running:
            for target in states:
                self._start(target)
        self._changed.set()

    # ---- what the checks say -------------------------------------------------------------

    def status(self, key: BackendKey) -> Status | None:
        """Status of one (VIP, backend); None when it is not checked."""
        target = self._targets.get(key)
        state = self._states.get(target) if target is not None else None
        return None if state is None else state.status

    def healthy(self, key: BackendKey) -> bool | None:
        """For the control API: True/False, None when it is not checked."""
        status = self.status(key)
        return None if status is None else status is Status.HEALTHY

    def _keys(self, *statuses: Status) -> Iterator[BackendKey]:
        for key, target in self._targets.items():
            if self._states[target].status in statuses:
                yield key

    def down(self) -> frozenset[BackendKey]:
        """(VIP, backend) pairs that get no new flows."""
        return frozenset(self._keys(Status.DOWN, Status.DEAD))

    def dead(self) -> frozenset[BackendKey]:
        """(VIP, backend) pairs whose pinned flows move."""
        return frozenset(self._keys(Status.DEAD))

    def record(self, target: Target, error: str | None, now_ms: int) -> Status | None:
        """One check result (`error` None: passed). Logs a change and returns it."""
        state = self._states.get(target)
        if state is None:
            return None  # no longer configured (a reload raced the check)
        was, since = state.status, state.since_ms
        change = state.observe(error is None, now_ms)
        if change is None:
            return None
        who = ", ".join(self._names.get(target, [])) or str(target)
        check = f"{self.health.kind} {target}"
        if change is Status.HEALTHY:
            log.info(
                "health: backend %s healthy again (%s: %d checks passed; it was %s for %.1f s)",
                who,
                check,
                state.rise,
                was,
                (now_ms - since) / 1000,
            )
        elif change is Status.DOWN:
            log.info(
                "health: backend %s DOWN (%s: %d checks failed, last: %s); no new flows, "
                "pinned flows stay on it for %d ms",
                who,
                check,
                state.fall,
                error,
                state.repin_after_ms,
            )
        else:
            log.info(
                "health: backend %s down for %d ms (%s, last: %s); its pinned flows move",
                who,
                now_ms - state.since_ms,
                check,
                error,
            )
        self._changed.set()
        return change

    # ---- running the checks --------------------------------------------------------------

    async def run(self, apply: Callable[[], Awaitable[None]]) -> None:
        """Check until cancelled; after state changes, await `apply()` (one at a time)."""
        self._running = True
        try:
            for target in self._states:
                self._start(target)
            while True:
                await self._changed.wait()
                self._changed.clear()
                try:
                    await apply()
                except Exception:  # the checks must outlive a failed apply; it retries
                    log.exception("health: applying check results failed")
                    await asyncio.sleep(self.health.interval_ms / 1000)
                    self._changed.set()
        finally:
            self._running = False
            tasks = list(self._tasks.values())
            self._tasks.clear()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _start(self, target: Target) -> None:
        if target not in self._tasks:
            task = asyncio.get_running_loop().create_task(self._check_loop(target))
            self._tasks[target] = task

    async def _check_loop(self, target: Target) -> None:
        loop = asyncio.get_running_loop()
        # Spread the targets over the interval rather than checking all at once.
        await asyncio.sleep(random.uniform(0, self.health.interval_ms / 1000))
        while True:
            started = loop.time()
            error = await self.check(target)
            self.record(target, error, self._clock())
            interval = self.health.interval_ms / 1000
            await asyncio.sleep(max(0.0, started + interval - loop.time()))

    async def check(self, target: Target) -> str | None:
        """Run one check of `target` within `timeout_ms`; None when it passed."""
        probe = self._probe_override or _probe_of(self.health)
        timeout_ms = self.health.timeout_ms
        try:
            async with asyncio.timeout(timeout_ms / 1000):
                return await probe(target)
        except TimeoutError:
            return f"no answer within {timeout_ms} ms"
        except OSError as exc:  # asyncio's connect errors carry the errno, not its text
            return os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__


# --- making it live ------------------------------------------------------------------------------


async def apply_health(fwd: Forwarder) -> None:
    """Rebuild the Maglev tables without the backends that are down (as a drain does) and drop
    the local flows of backends that just became dead, so that their next packet re-pins."""
    from forwarder.control import replan

    monitor = fwd.health
    async with fwd.change_lock:
        down, dead = monitor.down(), monitor.dead()
        previous = fwd.plan
        if down == previous.down and dead == previous.dead:
            return
        await replan(fwd, fwd.config, down=down, dead=dead)
        _warn_fail_open(fwd, down - previous.down)
        # The DOWN line is logged when the checks decide; new flows avoid the backend only
        # from here, once the Maglev tables without it are live.
        for ip in sorted({ip for _vip, ip in down - previous.down}):  # dead ones are down too
            log.info(
                "health: backend %s out of new-flow selection (Maglev tables rebuilt)",
                ipaddress.IPv6Address(ip),
            )
        for ip in sorted({ip for _vip, ip in dead - previous.dead}):
            bid = fwd.plan.backend_ids.get(ip)
            if bid is not None:
                dropped = forget_flows(fwd.engine, bid, ip)
                log.info(
                    "health: %d local flows of backend %s dropped; their next packets re-pin",
                    dropped,
                    ipaddress.IPv6Address(ip),
                )


def forget_flows(engine: Any, backend_id: int, ip: bytes) -> int:
    """Drop the local flows pinned to a backend and keep the backend (and its link)."""
    link = engine.backend_link(backend_id)
    dropped = int(engine.remove_backend(backend_id))
    if link is None:
        engine.set_backend(backend_id, ip)
    else:
        ifindex, src_mac, dst_mac, mtu = link
        engine.set_backend(
            backend_id, ip, dst_mac=dst_mac, src_mac=src_mac, ifindex=ifindex, mtu=mtu
        )
    return dropped


def _warn_fail_open(fwd: Forwarder, newly_down: frozenset[BackendKey]) -> None:
    if not newly_down:
        return
    down = fwd.plan.down
    for v in fwd.config.vips:
        key = (v.address.packed, v.port, int(v.protocol))
        active = [b for b in v.backends if b.state is BackendState.ACTIVE and b.weight > 0]
        touched = any((key, b.address.packed) in newly_down for b in v.backends)
        if touched and active and all((key, b.address.packed) in down for b in active):
            log.warning(
                "health: every backend of %s is down; ignoring the checks for it (fail open)", v
            )
