"""BGP announcement of the VIPs through BIRD 2: a POP announces them only while it can forward.

Workers report their health to the supervisor over a pipe (`heartbeat`); the supervisor's
`Announcer` turns worker exits, stalls and reports into announce/withdraw (`AnnounceDecision`,
pure) and applies that with `birdc enable|disable` on BIRD static protocols (`BirdControl`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import logging
import os
import re
import selectors
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowstate.control_client import ControlClient, ControlError
from forwarder.config import BackendState, BgpConfig, BgpKind, ForwarderConfig, VipConfig

if TYPE_CHECKING:
    from forwarder.service import BackendKey, Forwarder

log = logging.getLogger("flowstate.forwarder.bgp")

#: The desired state is applied again this often although nothing changed (BIRD restarted with
#: its config's `disabled yes`, or someone ran birdc by hand).
REASSERT_MS = 5000
#: A birdc call that failed is retried this often.
RETRY_MS = 1000
#: Longest wait for one birdc call.
BIRDC_TIMEOUT_S = 2.0
#: Longest line a worker or a control client may send.
MAX_LINE = 64 << 10

Clock = Callable[[], int]


def monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


def announcer_socket(control_socket: Path) -> Path:
    """The supervisor's socket for `flowstate bgp|drain-pop|undrain-pop`: ``<socket>.bgp``."""
    return control_socket.with_name(control_socket.name + ".bgp")


# ---- what a worker reports -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerReport:
    """A worker's heartbeat: sent while its event loop turns, with what it can serve."""

    vips_down: tuple[str, ...] = ()
    """VIPs without a backend that can take new flows."""
    store_connected: bool = True

    def encode(self) -> bytes:
        body = {"vips_down": list(self.vips_down), "store": self.store_connected}
        return json.dumps(body, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def decode(cls, line: bytes) -> WorkerReport:
        """Parse one heartbeat line; ValueError if it is not one."""
        body = json.loads(line)
        if not isinstance(body, dict):
            raise ValueError("heartbeat is not an object")
        vips, store = body.get("vips_down"), body.get("store")
        if not isinstance(vips, list) or not all(isinstance(v, str) for v in vips):
            raise ValueError("heartbeat vips_down is not a list of strings")
        if not isinstance(store, bool):
            raise ValueError("heartbeat store is not a boolean")
        return cls(tuple(vips), store)


def usable_backends(vip: VipConfig, down: Collection[BackendKey] = ()) -> int:
    """Backends of `vip` that can take new flows: active, weight above 0, and not taken out by
    health checks (`down`, as `Plan.down` holds them)."""
    key = (vip.address.packed, vip.port, int(vip.protocol))
    return sum(
        1
        for b in vip.backends
        if b.state is BackendState.ACTIVE and b.weight > 0 and (key, b.address.packed) not in down
    )


class _ReportCache:
    """`worker_report` walks every backend: only when the config or the plan changed."""

    def __init__(self) -> None:
        self.config: object = None
        self.plan: object = None
        self.vips_down: tuple[str, ...] = ()


def worker_report(fwd: Forwarder, cache: _ReportCache | None = None) -> WorkerReport:
    """This worker's health for the announcer. Health checks reach it through `Plan.down`
    (the backends forwarder/health.py takes out of new-flow selection)."""
    cache = cache if cache is not None else _ReportCache()
    if cache.config is not fwd.config or cache.plan is not fwd.plan:
        down = fwd.plan.down
        cache.vips_down = tuple(str(v) for v in fwd.config.vips if not usable_backends(v, down))
        cache.config, cache.plan = fwd.config, fwd.plan
    return WorkerReport(cache.vips_down, fwd.store is not None)


async def heartbeat(fwd: Forwarder, fd: int, interval_s: float) -> None:
    """Write a `WorkerReport` to the supervisor's pipe every `interval_s` while the loop turns."""
    os.set_blocking(fd, False)
    os.set_inheritable(fd, False)  # a child of the worker must not keep the pipe open
    cache = _ReportCache()
    try:
        while True:
            try:
                os.write(fd, worker_report(fwd, cache).encode())
            except BlockingIOError:
                pass  # the supervisor is behind; it only wants the newest report anyway
            except BrokenPipeError:
                return  # the supervisor is gone
            await asyncio.sleep(interval_s)
    finally:
        os.close(fd)


# ---- the decision (pure) ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerView:
    """What the supervisor knows of one worker at a check."""

    pid: int | None = None
    exit_code: int | None = None
    """Set once the process exited (negative: killed by that signal)."""
    report: WorkerReport | None = None
    """The newest heartbeat; None before the first."""
    seen_ms: int | None = None
    """When the newest heartbeat arrived."""
    gone: bool = False
    """It closed its heartbeat pipe (it is exiting)."""


def exit_text(code: int | None) -> str:
    if code is None:
        return "exited"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exited with status {code}"


def worker_trouble(now_ms: int, w: WorkerView, stall_ms: int) -> str | None:
    """What keeps one worker process from forwarding, or None while it runs and reports."""
    if w.exit_code is not None or w.gone:
        return exit_text(w.exit_code)
    if w.report is None or w.seen_ms is None:
        return "starting"
    if now_ms - w.seen_ms > stall_ms:
        return f"stalled (no heartbeat for {now_ms - w.seen_ms} ms)"
    return None


def pop_problems(
    now_ms: int, workers: Mapping[int, WorkerView], *, stall_ms: int, store_required: bool
) -> list[str]:
    """Why this POP cannot forward now (empty: it can), one phrase per problem."""
    out: list[str] = []
    if not workers:
        out.append("no worker running")
    for i, w in sorted(workers.items()):
        trouble = worker_trouble(now_ms, w, stall_ms)
        if trouble is not None:
            out.append(f"worker {i} {trouble}")
        elif w.report is not None:
            out.extend(f"no usable backend for {vip}" for vip in w.report.vips_down)
            if store_required and not w.report.store_connected:
                out.append("store not connected")
    return list(dict.fromkeys(out))  # workers share VIPs and the store: say each once


@dataclass(frozen=True, slots=True)
class Change:
    """Announce (True) or withdraw (False) the VIPs, and why."""

    announce: bool
    reason: str


class AnnounceDecision:
    """Checks in, announce/withdraw out. One failed check withdraws; health must hold for
    `announce_delay_ms` before the VIPs are (re-)announced. A drain withdraws without touching
    the health history, so an undrain of a healthy POP announces at once."""

    def __init__(self, announce_delay_ms: int) -> None:
        self.announce_delay_ms = announce_delay_ms
        self.announced = False
        self.reason = "starting"
        """Why the VIPs are in their present state."""
        self._healthy_since: int | None = None

    def check(
        self, now_ms: int, problems: Sequence[str], *, drained: bool = False, stopping: str = ""
    ) -> Change | None:
        """One check; the change to make, if any."""
        if problems:
            self._healthy_since = None
        elif self._healthy_since is None:
            self._healthy_since = now_ms
        if stopping:
            reason = stopping
        elif drained:
            reason = "POP drained (flowstate drain-pop)"
        elif problems:
            reason = "; ".join(problems)
        else:
            assert self._healthy_since is not None
            healthy_ms = now_ms - self._healthy_since
            if healthy_ms < self.announce_delay_ms:
                if not self.announced:
                    self.reason = f"healthy for {healthy_ms} ms of {self.announce_delay_ms} ms"
                return None
            if self.announced:
                return None
            self.announced, self.reason = True, f"healthy for {healthy_ms} ms"
            return Change(True, self.reason)
        self.reason = reason
        if not self.announced:
            return None
        self.announced = False
        return Change(False, reason)


# ---- BIRD --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BirdResult:
    changed: tuple[str, ...] = ()
    """Protocols whose state this call changed (the rest already were so)."""
    error: str | None = None


Runner = Callable[..., "subprocess.CompletedProcess[str]"]


class BirdControl:
    """`birdc -s SOCKET enable|disable PROTOCOL` for each VIP protocol."""

    def __init__(self, bgp: BgpConfig, run: Runner = subprocess.run) -> None:
        self.birdc = bgp.birdc
        self.socket = bgp.socket
        self.protocols = bgp.protocols
        self._run = run

    def apply(self, announce: bool) -> BirdResult:
        verb = "enable" if announce else "disable"
        changed: list[str] = []
        errors: list[str] = []
        for proto in self.protocols:
            argv = [self.birdc, "-s", str(self.socket), verb, proto]
            try:
                result = self._run(argv, capture_output=True, text=True, timeout=BIRDC_TIMEOUT_S)
            except FileNotFoundError:
                return BirdResult(tuple(changed), f"{self.birdc}: not found")
            except subprocess.TimeoutExpired:
                errors.append(f"birdc {verb} {proto}: no answer in {BIRDC_TIMEOUT_S:g} s")
                continue
            except OSError as exc:
                return BirdResult(tuple(changed), f"{self.birdc}: {exc.strerror or exc}")
            out = f"{result.stdout}\n{result.stderr}"
            match = re.search(rf"^{re.escape(proto)}: (already )?{verb}d\s*$", out, re.M)
            if match is None:
                lines = [ln for ln in out.splitlines() if ln.strip() and "ready." not in ln]
                detail = lines[-1].strip() if lines else f"exit status {result.returncode}"
                errors.append(f"birdc {verb} {proto}: {detail}")
            elif match.group(1) is None:
                changed.append(proto)
        return BirdResult(tuple(changed), "; ".join(errors) or None)


# ---- the supervisor's announcer ----------------------------------------------------------------


@dataclass
class _Worker:
    proc: subprocess.Popen[bytes]
    fd: int | None
    buf: bytes = b""
    report: WorkerReport | None = None
    seen_ms: int | None = None
    gone: bool = False

    def view(self) -> WorkerView:
        return WorkerView(self.proc.pid, self.proc.poll(), self.report, self.seen_ms, self.gone)


@dataclass
class _Client:
    sock: socket.socket
    buf: bytes = b""


@dataclass
class _Status:
    applied: bool | None = None
    """What BIRD was last told successfully; None before the first call."""
    bird_error: str | None = None
    changed_ms: int = 0
    changes: int = 0
    problems: list[str] = field(default_factory=list)


class Announcer:
    """Runs in the supervisor: watches the workers, decides, tells BIRD, serves the
    ``<control socket>.bgp`` socket (`bgp`, `drain_pop`, `undrain_pop`)."""

    def __init__(
        self,
        config: ForwarderConfig,
        *,
        bird: BirdControl | None = None,
        clock: Clock = monotonic_ms,
        serve: bool = True,
    ) -> None:
        if config.bgp.kind is not BgpKind.BIRD:
            raise ValueError("the announcer needs [bgp] kind = 'bird'")
        self.config = config
        self.bgp = config.bgp
        self.store_required = config.bgp.withdraw_on_store_loss or not config.store.fallback
        self.bird = bird if bird is not None else BirdControl(config.bgp)
        self.decision = AnnounceDecision(config.bgp.announce_delay_ms)
        self.status = _Status()
        self.path = announcer_socket(config.control.socket) if serve else None
        self._clock = clock
        self._workers: dict[int, _Worker] = {}
        self._clients: dict[int, _Client] = {}
        self._selector = selectors.DefaultSelector()
        self._server: socket.socket | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        self._next_check = 0
        self._retry_at = 0
        self._reassert_at = 0
        self._check_now = False
        self.interrupted = False
        self.drained = self._read_drain_file()

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Listen on the announcer socket and withdraw until the workers are healthy (a
        previous run killed without clean-up may have left the VIPs announced)."""
        if self.path is not None:
            self._listen(self.path)
        log.info(
            "BGP: announcing the VIPs through BIRD at %s (%s) while this POP can forward%s",
            self.bgp.socket,
            ", ".join(self.bird.protocols),
            "; DRAINED now" if self.drained else "",
        )
        now = self._clock()
        self._apply(now, False, "starting: not announced until the workers are healthy")
        self._next_check = now

    def _listen(self, path: Path) -> None:
        if len(os.fsencode(path)) > 107:
            raise OSError(errno.ENAMETOOLONG, f"announcer socket path too long: {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        # The supervisor checked that no live forwarder owns the control socket: a file here
        # is a dead run's.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # born 0600, like the control socket
        try:
            sock.bind(str(path))
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old)
        sock.listen(8)
        sock.setblocking(False)
        self._server = sock
        self._selector.register(sock, selectors.EVENT_READ, self._on_accept)

    def close(self, reason: str) -> None:
        """Withdraw (the forwarder is stopping), then close everything."""
        now = self._clock()
        change = self.decision.check(now, self.status.problems, stopping=reason)
        if change is not None or self.status.applied is not False:
            self._apply(now, False, reason)
        for w in self._workers.values():
            self._close_pipe(w)
        for fd in list(self._clients):
            self._drop_client(fd)
        if self._server is not None:
            self._selector.unregister(self._server)
            self._server.close()
            self._server = None
            if self.path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def interrupt(self) -> None:
        """Wake `wait` (safe in a signal handler)."""
        self.interrupted = True
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"!")

    # ---- workers -------------------------------------------------------------------------

    def start_worker(self, worker: int, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        """Start a worker with a heartbeat pipe (``--heartbeat-fd N`` appended to `argv`)."""
        old = self._workers.pop(worker, None)
        if old is not None:
            self._close_pipe(old)
        r, w = os.pipe()
        try:
            proc = subprocess.Popen([*argv, "--heartbeat-fd", str(w)], pass_fds=(w,))
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)  # only the worker holds the write end: its exit is our EOF
        os.set_blocking(r, False)
        entry = self._workers[worker] = _Worker(proc, r)
        on_beat = functools.partial(self._on_heartbeat, entry)
        self._selector.register(r, selectors.EVENT_READ, on_beat)
        return proc

    def _close_pipe(self, w: _Worker) -> None:
        if w.fd is not None:
            self._selector.unregister(w.fd)
            os.close(w.fd)
            w.fd = None

    def _on_heartbeat(self, w: _Worker, fd: int) -> None:
        try:
            data = os.read(fd, MAX_LINE)
        except BlockingIOError:
            return
        if not data:
            w.gone = True
            self._close_pipe(w)
            self._check_now = True  # a worker died: withdraw now, not at the next tick
            return
        w.buf += data
        *lines, w.buf = w.buf.split(b"\n")
        if len(w.buf) > MAX_LINE:
            w.buf = b""
        for line in reversed(lines):
            try:
                w.report = WorkerReport.decode(line)
            except ValueError:
                continue
            w.seen_ms = self._clock()
            break

    # ---- checking ------------------------------------------------------------------------

    def wait(self, timeout_s: float) -> None:
        """Serve heartbeats, control requests and checks for `timeout_s` (or until
        `interrupt`)."""
        deadline = self._clock() + round(timeout_s * 1000)
        while not self.interrupted:
            now = self._clock()
            if self._check_now or now >= self._next_check:
                self._guarded(self.check)
                now = self._clock()
            if now >= deadline:
                return
            timeout = max(0, min(deadline, self._next_check) - now) / 1000
            for key, _events in self._selector.select(timeout):
                self._guarded(functools.partial(key.data, key.fileobj))

    def _guarded(self, call: Callable[[], object]) -> None:
        # A bug here must not end the supervisor: its workers would run on unsupervised, and
        # the VIPs would stay announced with nobody to withdraw them.
        try:
            call()
        except Exception:
            log.exception("BGP: announcer error (going on)")

    def check(self) -> None:
        """One health check: decide, and tell BIRD when the decision changed (or must be
        retried or reasserted)."""
        now = self._clock()
        self._check_now = False
        self._next_check = now + self.bgp.check_interval_ms
        views = {i: w.view() for i, w in self._workers.items()}
        problems = pop_problems(
            now, views, stall_ms=self.bgp.stall_timeout_ms, store_required=self.store_required
        )
        self.status.problems = problems
        change = self.decision.check(now, problems, drained=self.drained)
        if change is not None:
            self._apply(now, change.announce, change.reason)
        elif self.status.applied != self.decision.announced and now >= self._retry_at:
            self._apply(now, self.decision.announced, self.decision.reason)
        elif now >= self._reassert_at:
            self._apply(now, self.decision.announced, self.decision.reason, reassert=True)

    def _apply(self, now: int, announce: bool, reason: str, *, reassert: bool = False) -> None:
        result = self.bird.apply(announce)
        self._reassert_at = now + REASSERT_MS
        what = "announced" if announce else "withdrew"
        protocols = ", ".join(self.bird.protocols)
        if result.error is not None:
            self._retry_at = now + RETRY_MS
            if result.error != self.status.bird_error:
                log.warning(
                    "BGP: could not %s the VIPs (%s): %s; retrying every %d ms",
                    "announce" if announce else "withdraw",
                    protocols,
                    result.error,
                    RETRY_MS,
                )
            self.status.bird_error = result.error
            return
        if self.status.bird_error is not None:
            log.info("BGP: BIRD answers again")
        self.status.bird_error = None
        before = self.status.applied
        self.status.applied = announce
        if before != announce:
            self.status.changed_ms = now
            self.status.changes += before is not None
        if reassert and result.changed:
            log.warning(
                "BGP: BIRD had %s %s against our state (BIRD restarted?); %s them again: %s",
                ", ".join(result.changed),
                "disabled" if announce else "enabled",
                what,
                reason,
            )
        elif before != announce and (before is not None or result.changed):
            log.info("BGP: %s the VIPs (%s): %s", what, protocols, reason)

    # ---- drain ---------------------------------------------------------------------------

    def _read_drain_file(self) -> bool:
        path = self.bgp.drain_file
        if path is None or not path.exists():
            return False
        log.warning(
            "BGP: POP drained (%s exists, written by flowstate drain-pop): not announcing "
            "until flowstate undrain-pop",
            path,
        )
        return True

    def set_drained(self, drained: bool) -> str | None:
        """Drain or undrain the POP and apply it at once; a warning if it is not persisted."""
        warning = None
        path = self.bgp.drain_file
        if path is not None:
            try:
                if drained:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
                    path.write_text(f"drained by flowstate drain-pop at {stamp}\n")
                else:
                    path.unlink(missing_ok=True)
            except OSError as exc:
                warning = f"drain file {path}: {exc.strerror or exc} (the drain ends on restart)"
                log.warning("BGP: %s", warning)
        if drained != self.drained:
            command = "drain-pop" if drained else "undrain-pop"
            log.info("BGP: POP %sed by flowstate %s", command.removesuffix("-pop"), command)
        self.drained = drained
        self.check()
        return warning

    # ---- the announcer socket -------------------------------------------------------------

    def _on_wake(self, fd: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(fd, 512)

    def _on_accept(self, server: socket.socket) -> None:
        try:
            sock, _ = server.accept()
        except (BlockingIOError, InterruptedError):
            return
        sock.settimeout(1.0)  # answers are small; a reader that does not read is dropped
        self._clients[sock.fileno()] = _Client(sock)
        self._selector.register(sock, selectors.EVENT_READ, self._on_client)

    def _drop_client(self, fd: int) -> None:
        client = self._clients.pop(fd, None)
        if client is not None:
            self._selector.unregister(client.sock)
            client.sock.close()

    def _on_client(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        client = self._clients[fd]
        try:
            data = sock.recv(MAX_LINE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop_client(fd)
            return
        client.buf += data
        try:
            while b"\n" in client.buf:
                line, client.buf = client.buf.split(b"\n", 1)
                sock.sendall(json.dumps(self.answer(line)).encode() + b"\n")
            if len(client.buf) > MAX_LINE:
                raise OSError("request line too long")
        except OSError:
            self._drop_client(fd)

    def answer(self, line: bytes) -> dict[str, Any]:
        """One request line → its answer (the control API's JSON-lines protocol)."""
        try:
            request = json.loads(line)
        except ValueError:
            return {"id": None, "error": {"code": "bad_request", "message": "not JSON"}}
        if not isinstance(request, dict):
            return {"id": None, "error": {"code": "bad_request", "message": "not an object"}}
        rid, method = request.get("id"), request.get("method")
        if method == "drain_pop":
            warning = self.set_drained(True)
        elif method == "undrain_pop":
            warning = self.set_drained(False)
        elif method in ("bgp", "ping"):
            warning = None
        else:
            message = f"unknown method {method!r} (known: bgp, drain_pop, ping, undrain_pop)"
            return {"id": rid, "error": {"code": "unknown_method", "message": message}}
        result = self.snapshot()
        if warning is not None:
            result["warning"] = warning
        return {"id": rid, "result": result}

    def snapshot(self) -> dict[str, Any]:
        """The announce state, as `flowstate bgp` shows it."""
        now = self._clock()
        s = self.status
        workers = []
        for i, w in sorted(self._workers.items()):
            v = w.view()
            trouble = worker_trouble(now, v, self.bgp.stall_timeout_ms)
            workers.append(
                {
                    "worker": i,
                    "pid": v.pid,
                    "state": "running" if trouble is None else trouble,
                    "heartbeat_ms_ago": None if v.seen_ms is None else now - v.seen_ms,
                }
            )
        return {
            "pop": self.config.pop,
            "pid": os.getpid(),
            "kind": str(self.bgp.kind),
            "protocols": list(self.bird.protocols),
            "announced": s.applied,
            "want_announced": self.decision.announced,
            "drained": self.drained,
            "healthy": not s.problems,
            "problems": list(s.problems),
            "reason": self.decision.reason,
            "since_s": (now - s.changed_ms) / 1000 if s.changes else None,
            "changes": s.changes,
            "bird_error": s.bird_error,
            "workers": workers,
        }


# ---- for the control API, the CLI and systemd ---------------------------------------------------


async def announcer_status(config: ForwarderConfig, timeout: float = 0.5) -> dict[str, Any] | None:
    """The announcer's `bgp` answer (for the control API's `stats`); None without BGP."""
    if config.bgp.kind is BgpKind.NONE:
        return None
    try:
        path = announcer_socket(config.control.socket)
        async with await ControlClient.connect(path, timeout=timeout) as client:
            result: dict[str, Any] = await client.call("bgp")
            return result
    except ControlError as exc:
        return {"error": exc.message}


def withdraw_now(config: ForwarderConfig) -> BirdResult:
    """Disable the VIP protocols without a running forwarder (systemd's ExecStopPost)."""
    return BirdControl(config.bgp).apply(False)
