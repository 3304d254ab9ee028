"""The forwarder's control API (JSON lines on a Unix socket, mode 0600) and its metrics endpoint.

Served by the worker's own event loop (`Forwarder.run` starts it). Worker 0 listens on the
configured socket and answers for the whole forwarder: it fans `stats`, `flow` and backend changes
out to the other workers over their sockets (``<socket>.<n>``). The protocol and typed client are
in `flowstate.control_client`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import fcntl
import ipaddress
import json
import logging
import os
import socket
import stat
import time
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowstate.control_client import (
    BackendInfo,
    ControlClient,
    ControlError,
    VipInfo,
    VipSelector,
)
from flowstate.errors import ConfigError, StoreUnavailable, UsageError
from flowstate.flow import FiveTuple
from flowstate.record import FlowRecord
from forwarder import maglev, overrides
from forwarder.bgp import announcer_status
from forwarder.config import BackendConfig, BackendState, ForwarderConfig, VipConfig
from forwarder.metrics import MetricsServer, StoreLatency
from forwarder.service import apply_plan, monotonic_ms, plan_engine

if TYPE_CHECKING:
    from forwarder.service import BackendKey, Forwarder, Plan

log = logging.getLogger("flowstate.forwarder")

#: A control connection idle this long is closed.
IDLE_TIMEOUT_S = 300.0
#: Control connections served at once; more are answered with an error and closed.
MAX_CONNECTIONS = 32
#: How long worker 0 waits for another worker's answer to a read (`stats`, `flow`).
PEER_TIMEOUT_S = 2.0
#: ... and to a change (`drain`, `undrain`, `weight`, `reset`, `reload`): the worker first waits
#: for its change lock (a health-check replan or a reload may hold it), then replans: every VIP's
#: Maglev table rebuilt in Python off its event loop (about 35 ms of CPU per 65,537-entry table,
#: so 150 ms for four VIPs, and seconds of wall time on a loaded host). Below the CLI's wait for
#: a change (`flowstate.cli_ops.RELOAD_TIMEOUT_S`), so that the CLI still hears which worker did
#: not answer.
PEER_CHANGE_TIMEOUT_S = 20.0
_CHANGES = frozenset({"drain", "undrain", "weight", "reset", "reload"})
#: Deadline of the store lookup a `flow` request makes.
FLOW_STORE_DEADLINE_MS = 500.0
_STATE_NAMES = {1: "established", 2: "closing"}


class Refusal(Exception):
    """A request the server answers with an error (`code`, `message`); never logged as a bug."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def worker_socket(path: Path, worker: int) -> Path:
    """Control socket of `worker`: the configured path for worker 0, ``<path>.<n>`` otherwise."""
    return path if worker == 0 else path.with_name(f"{path.name}.{worker}")


def socket_in_use(path: Path) -> str | None:
    """Why a new forwarder must not start on control socket `path` (a live one holds its
    lock), or None. For the worker supervisor, before it starts workers that would only fail."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return f"control socket {path} is in use by a running forwarder; refusing to start"
    finally:
        os.close(fd)  # closing drops the lock we may have taken
    return None


def record_json(rec: FlowRecord) -> dict[str, Any]:
    return {
        "backend": str(rec.backend),
        "vip": str(rec.vip),
        "pop": rec.pop,
        "created_ms": rec.created_ms,
        "version": rec.version,
    }


async def replan(
    fwd: Forwarder,
    config: ForwarderConfig,
    *,
    down: frozenset[BackendKey] | None = None,
    dead: frozenset[BackendKey] | None = None,
) -> None:
    """Make `config`'s VIPs, backends, weights and states live through the start-up path
    (`plan_engine` + `apply_plan`), with the backends health checks took out (`down`, `dead`;
    default: as before). Flows in the local table are kept, except those of VIPs and backends
    no longer configured (a reload); so are the backends' resolved links, which `apply_plan`
    would otherwise reset until the next neighbour change. Callers hold `fwd.change_lock`."""
    # Maglev tables take tens of ms per VIP in Python: build them off the event loop.
    plan = await asyncio.to_thread(plan_engine, config, fwd.plan, down=down, dead=dead)
    engine = fwd.engine
    links = {bid: engine.backend_link(bid) for bid in fwd.plan.backend_ids.values()}
    # What the new plan no longer has goes first, with its flows: its ids may be reused.
    for key, vip_id in fwd.plan.vip_ids.items():
        if key not in plan.vip_ids:
            engine.remove_vip(vip_id)
            fwd.core.remove_vip(*key)
    for ip, bid in fwd.plan.backend_ids.items():
        if ip not in plan.backend_ids:
            engine.remove_backend(bid)
    apply_plan(engine, fwd.core, plan, config)
    for ip, bid in plan.backend_ids.items():
        link = links.get(bid)
        if link is not None:
            ifindex, src_mac, dst_mac, mtu = link
            engine.set_backend(bid, ip, dst_mac=dst_mac, src_mac=src_mac, ifindex=ifindex, mtu=mtu)
    fwd.config = config
    fwd.plan = plan


class Operations:
    """Control socket + metrics endpoint of one worker."""

    def __init__(self, fwd: Forwarder) -> None:
        self.fwd = fwd
        self.latency = StoreLatency()
        self.started = time.monotonic()
        self.path = worker_socket(fwd.config.control.socket, fwd.worker)
        self._server: asyncio.Server | None = None
        self._metrics: MetricsServer | None = None
        self._lock_fd: int | None = None
        self._inode: int | None = None
        self._change_lock = fwd.change_lock  # shared with health checks and reload
        self._connections = 0
        self._slots: tuple[Plan, dict[int, collections.Counter[int]]] | None = None
        self._methods: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {
            "ping": self._ping,
            "stats": self._stats,
            "flow": self._flow,
            "backends": self._backends,
            "drain": self._drain,
            "undrain": self._undrain,
            "weight": self._weight,
            "reset": self._reset,
            "reload": self._reload,
        }

    @property
    def configured(self) -> ForwarderConfig:
        """The config file's settings (at start or the last reload), before runtime changes."""
        return self.fwd.configured

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Claim the socket (refusing if a live forwarder holds it), listen, start metrics."""
        if len(os.fsencode(self.path)) > 107:
            raise OSError(errno.ENAMETOOLONG, f"control socket path too long: {self.path}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        await self._claim()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o177)  # the socket file is born 0600: no window where others connect
            try:
                sock.bind(str(self.path))
            finally:
                os.umask(old)
            os.chmod(self.path, 0o600)
            self._inode = os.stat(self.path).st_ino
            self._server = await asyncio.start_unix_server(self._client, sock=sock, limit=4 << 20)
        except BaseException:
            sock.close()
            self._release()
            raise
        self.fwd.store_observer = self.latency.observe
        metrics = self.fwd.config.control.metrics
        if metrics is not None and self.fwd.worker == 0:
            server = MetricsServer(self._gather_metrics)
            try:
                await server.start(metrics.host, metrics.port)
            except OSError as exc:
                # Forwarding matters more than scraping: say so loudly and go on.
                log.error("metrics endpoint %s not started: %s", metrics, exc.strerror or exc)
            else:
                self._metrics = server
                log.info("metrics on http://%s/metrics", metrics)
        log.info("control API on %s", self.path)

    async def _claim(self) -> None:
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OSError(errno.EADDRINUSE, await self._busy_message()) from None
        self._lock_fd = fd
        # We hold the lock: whatever socket file is there belongs to a dead process, unless
        # a forwarder that predates the lock answers on it.
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            self._release()
            raise OSError(errno.EEXIST, f"{self.path} exists and is not a socket; not touching it")
        try:
            async with asyncio.timeout(1.0):
                _, writer = await asyncio.open_unix_connection(str(self.path))
        except (ConnectionRefusedError, FileNotFoundError):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            log.info("removed stale control socket %s", self.path)
            return
        except (OSError, TimeoutError) as exc:
            self._release()
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            raise OSError(errno.EADDRINUSE, f"{self.path}: cannot check it ({reason})") from None
        writer.close()
        self._release()
        raise OSError(errno.EADDRINUSE, await self._busy_message())

    async def _busy_message(self) -> str:
        who = "another process"
        with contextlib.suppress(ControlError, OSError):
            async with await ControlClient.connect(self.path, timeout=1.0) as client:
                info = await client.ping()
                who = f"a running forwarder (POP {info.get('pop')}, pid {info.get('pid')})"
        return f"control socket {self.path} is in use by {who}; refusing to start"

    def _release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def close(self) -> None:
        if self.fwd.store_observer == self.latency.observe:
            self.fwd.store_observer = None
        if self._metrics is not None:
            await self._metrics.close()
            self._metrics = None
        if self._server is not None:
            self._server.close()
            self._server = None
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == self._inode:
                    os.unlink(self.path)
        self._release()

    # ---- the protocol --------------------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections += 1
        try:
            if self._connections > MAX_CONNECTIONS:
                refusal = {"code": "busy", "message": "too many control connections"}
                writer.write(json.dumps({"id": None, "error": refusal}).encode() + b"\n")
                await writer.drain()
                return
            while True:
                async with asyncio.timeout(IDLE_TIMEOUT_S):
                    line = await reader.readline()
                if not line:
                    return
                answer = await self.answer(line)
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
        except (TimeoutError, OSError, ValueError):
            pass  # idle, gone, or a line over the limit: drop the connection
        finally:
            self._connections -= 1
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def answer(self, line: bytes) -> dict[str, Any]:
        """One request line → its answer object (never raises for a bad request)."""
        try:
            request = json.loads(line)
        except ValueError:
            return {"id": None, "error": {"code": "bad_request", "message": "not JSON"}}
        if not isinstance(request, dict):
            return {"id": None, "error": {"code": "bad_request", "message": "not an object"}}
        rid = request.get("id")
        method, params = request.get("method"), request.get("params", {})
        handler = self._methods.get(method) if isinstance(method, str) else None
        if handler is None:
            known = ", ".join(sorted(self._methods))
            message = f"unknown method {method!r} (known: {known})"
            return {"id": rid, "error": {"code": "unknown_method", "message": message}}
        if not isinstance(params, dict):
            return {"id": rid, "error": {"code": "bad_params", "message": "params: not an object"}}
        try:
            return {"id": rid, "result": await handler(params)}
        except Refusal as exc:
            return {"id": rid, "error": {"code": exc.code, "message": exc.message}}
        except (UsageError, ConfigError) as exc:
            return {"id": rid, "error": {"code": "bad_params", "message": str(exc)}}
        except Exception as exc:  # a control request must never take the forwarder down
            log.exception("control request %r failed", method)
            message = f"{type(exc).__name__}: {exc}"
            return {"id": rid, "error": {"code": "internal", "message": message}}

    # ---- fan-out to the other workers ----------------------------------------------------

    def _peers(self, params: dict[str, Any]) -> list[int]:
        if params.get("local") or self.fwd.worker != 0:
            return []
        return list(range(1, self.fwd.config.workers))

    async def _ask_peers(
        self, method: str, params: dict[str, Any]
    ) -> tuple[list[Any], list[dict[str, Any]]]:
        """Ask every other worker (`local`: no further fan-out); (answers, errors)."""
        peers = self._peers(params)
        timeout = PEER_CHANGE_TIMEOUT_S if method in _CHANGES else PEER_TIMEOUT_S

        async def ask(worker: int) -> Any:
            path = worker_socket(self.configured.control.socket, worker)
            async with await ControlClient.connect(path, timeout=timeout) as client:
                return await client.call(method, {**params, "local": True})

        results = await asyncio.gather(*(ask(w) for w in peers), return_exceptions=True)
        answers: list[Any] = []
        errors: list[dict[str, Any]] = []
        for worker, result in zip(peers, results, strict=True):
            if isinstance(result, ControlError):
                errors.append({"worker": worker, "message": result.message})
            elif isinstance(result, BaseException):
                errors.append({"worker": worker, "message": f"{type(result).__name__}: {result}"})
            else:
                answers.append(result)
        return answers, errors

    # ---- methods -------------------------------------------------------------------------

    async def _ping(self, params: dict[str, Any]) -> dict[str, Any]:
        fwd = self.fwd
        return {
            "pop": fwd.config.pop,
            "pid": os.getpid(),
            "worker": fwd.worker,
            "workers": fwd.config.workers,
            "uptime_s": time.monotonic() - self.started,
        }

    def worker_stats(self) -> dict[str, Any]:
        """This worker's counters (the `stats` entry of one worker)."""
        fwd = self.fwd
        store = fwd.store
        return {
            "worker": fwd.worker,
            "pid": os.getpid(),
            "impl": str(fwd.config.impl),
            "uptime_s": time.monotonic() - self.started,
            "engine": dict(fwd.engine.counters()),
            "core": dict(fwd.core.counters),
            "forwarder": dict(fwd.counters),
            "queued_frames": fwd.core.queued_frames,
            "rings": [
                {"interface": str(getattr(r, "ifname", "?")), "counters": dict(r.counters())}
                for r in fwd.rings
            ],
            "store": {
                "kind": str(fwd.config.store.kind),
                "connected": store is not None,
                "counters": dict(getattr(store, "counters", {})),
            },
            "store_latency": self.latency.snapshot(),
        }

    async def _stats(self, params: dict[str, Any]) -> dict[str, Any]:
        workers = [self.worker_stats()]
        answers, errors = await self._ask_peers("stats", params)
        for answer in answers:
            workers.extend(answer.get("workers", []))
        result: dict[str, Any] = {"pop": self.fwd.config.pop, "workers": workers, "errors": errors}
        if not params.get("local"):
            # The announce state lives in the supervisor (forwarder.bgp); None without BGP.
            result["bgp"] = await announcer_status(self.fwd.config)
        return result

    async def _gather_metrics(self) -> tuple[str, list[dict[str, Any]]]:
        stats = await self._stats({})
        workers: list[dict[str, Any]] = stats["workers"]
        if workers:
            workers[0] = {**workers[0], "backends": self.vip_infos(None)}
        return stats["pop"], workers

    def _vip_of(self, t: FiveTuple) -> tuple[int, VipConfig]:
        plan = self.fwd.plan
        vip_id = plan.vip_ids.get((t.vip_ip, t.vip_port, int(t.proto)))
        if vip_id is None:
            known = ", ".join(str(v) for v in self.fwd.config.vips)
            vip = f"{t.proto.name.lower()} {_hostport(t.vip, t.vip_port)}"
            raise Refusal("unknown_vip", f"{vip} is not a VIP of this forwarder (VIPs: {known})")
        key = (t.vip_ip, t.vip_port, int(t.proto))
        return vip_id, next(v for v in self.fwd.config.vips if _vip_key(v) == key)

    async def _flow(self, params: dict[str, Any]) -> dict[str, Any]:
        try:
            t = FiveTuple.make(
                params.get("proto", "tcp"),
                params["client_ip"],
                params["client_port"],
                params["vip_ip"],
                params["vip_port"],
            )
        except KeyError as exc:
            raise Refusal("bad_params", f"missing parameter {exc.args[0]!r}") from None
        fwd = self.fwd
        vip_id, vip = self._vip_of(t)
        names = {bid: str(ipaddress.IPv6Address(ip)) for ip, bid in fwd.plan.backend_ids.items()}
        flow = (int(t.proto), t.client_ip, t.client_port, t.vip_ip, t.vip_port)
        local: list[dict[str, Any]] = []
        entry = fwd.engine.lookup(flow)
        if entry is not None:
            bid, state, expires_ms = entry
            local.append(
                {
                    "worker": fwd.worker,
                    "backend": names.get(bid, f"#{bid}"),
                    "state": _STATE_NAMES.get(state, str(state)),
                    "expires_in_ms": expires_ms - monotonic_ms(),
                }
            )
        pick = fwd.engine.maglev_pick(vip_id, t.hash64())
        result: dict[str, Any] = {
            "flow": str(t),
            "vip": str(vip),
            "local": local,
            "maglev": names.get(pick) if pick >= 0 else None,
        }
        if params.get("local"):
            return result
        answers, errors = await self._ask_peers("flow", params)
        for answer in answers:
            local.extend(answer.get("local", []))
        result["errors"] = errors
        result["store"] = await self._store_view(t)
        return result

    async def _store_view(self, t: FiveTuple) -> dict[str, Any]:
        store = self.fwd.store
        if store is None:
            return {"status": "not_connected"}
        try:
            (rec,) = await store.lookup_many([t], deadline_ms=FLOW_STORE_DEADLINE_MS)
            ttl = await store.ttl_ms(t) if rec is not None else None
        except StoreUnavailable as exc:
            return {"status": "unavailable", "error": str(exc)}
        if rec is None:
            return {"status": "absent"}
        return {"status": "found", "record": record_json(rec), "ttl_ms": ttl}

    def _slot_counts(self) -> dict[int, collections.Counter[int]]:
        plan = self.fwd.plan
        if self._slots is None or self._slots[0] is not plan:
            counts: dict[int, collections.Counter[int]] = {}
            for vip_id, table in plan.tables.items():
                entries = array("H")
                entries.frombytes(table)
                counts[vip_id] = collections.Counter(entries)
            self._slots = (plan, counts)
        return self._slots[1]

    def vip_infos(self, selector: VipSelector | None) -> list[VipInfo]:
        config, plan = self.fwd.config, self.fwd.plan
        slots = self._slot_counts()
        configured = {
            (v.address, v.port, v.protocol, b.address): b
            for v in self.configured.vips
            for b in v.backends
        }
        out: list[VipInfo] = []
        for v in config.vips:
            if selector is not None and not selector.matches(v.address.packed, v.port, v.protocol):
                continue
            vip_id = plan.vip_ids[_vip_key(v)]  # not its position after a reload
            backends: list[BackendInfo] = []
            for b in v.backends:
                orig = configured.get((v.address, v.port, v.protocol, b.address), b)
                bid = plan.backend_ids[b.address.packed]
                backends.append(
                    {
                        "address": str(b.address),
                        "weight": b.weight,
                        "state": str(b.state),
                        "healthy": self.fwd.health.healthy((_vip_key(v), b.address.packed)),
                        "slots": slots.get(vip_id, collections.Counter()).get(bid, 0),
                        "configured_weight": orig.weight,
                        "configured_state": str(orig.state),
                    }
                )
            out.append(
                {
                    "vip": str(v),
                    "address": str(v.address),
                    "port": v.port,
                    "protocol": v.protocol.name.lower(),
                    "maglev_size": v.maglev_size,
                    "backends": backends,
                }
            )
        if selector is not None and not out:
            raise Refusal("unknown_vip", self._no_vip(selector))
        return out

    def _no_vip(self, selector: VipSelector) -> str:
        known = ", ".join(str(v) for v in self.fwd.config.vips)
        return f"no VIP of this forwarder matches {selector} (VIPs: {known})"

    async def _backends(self, params: dict[str, Any]) -> dict[str, Any]:
        raw = params.get("vip")
        selector = VipSelector.from_params(raw) if raw is not None else None
        state_file = self.configured.control.state_file
        return {
            "pop": self.fwd.config.pop,
            "worker": self.fwd.worker,
            "vips": self.vip_infos(selector),
            "state_file": None if state_file is None else str(state_file),
        }

    async def _drain(self, params: dict[str, Any]) -> dict[str, Any]:
        return await self._change(
            "drain", params, lambda v, b: replace(b, state=BackendState.DRAINING)
        )

    async def _undrain(self, params: dict[str, Any]) -> dict[str, Any]:
        return await self._change(
            "undrain", params, lambda v, b: replace(b, state=BackendState.ACTIVE)
        )

    async def _weight(self, params: dict[str, Any]) -> dict[str, Any]:
        if params.get("reset") is True:  # back to the config file's weight
            return await self._change(
                "weight", params, lambda v, b: replace(b, weight=self._as_configured(v, b).weight)
            )
        weight = params.get("weight")
        if type(weight) is not int or not 0 <= weight <= maglev.MAX_WEIGHT:
            raise Refusal("bad_params", f"weight must be an integer 0..{maglev.MAX_WEIGHT}")
        return await self._change("weight", params, lambda v, b: replace(b, weight=weight))

    async def _reset(self, params: dict[str, Any]) -> dict[str, Any]:
        """Drop a backend's runtime overrides: the config file's state and weight again."""
        return await self._change("reset", params, self._as_configured)

    def _as_configured(self, v: VipConfig, b: BackendConfig) -> BackendConfig:
        for cv in self.configured.vips:
            if _vip_key(cv) == _vip_key(v):
                for cb in cv.backends:
                    if cb.address == b.address:
                        return replace(b, state=cb.state, weight=cb.weight)
        return b

    def _save_overrides(self) -> str | None:
        """Worker 0: write the running overrides to the state file (forwarder.overrides); why
        not (the change itself is live anyway), or None."""
        path = self.configured.control.state_file
        if path is None:
            return None
        try:
            previous = overrides.load(path)
        except overrides.StateFileError:
            previous = {}
        try:
            overrides.save(path, overrides.diff(self.configured, self.fwd.config, previous))
        except OSError as exc:
            log.error("overrides: cannot write %s: %s", path, exc.strerror or exc)
            reason = exc.strerror or exc
            return f"not saved to {path} ({reason}): lost at the next reload or restart"
        return None

    async def _change(
        self,
        method: str,
        params: dict[str, Any],
        edit: Callable[[VipConfig, BackendConfig], BackendConfig],
    ) -> dict[str, Any]:
        """Apply `edit` to the backend in every selected VIP, then on the other workers."""
        text = params.get("backend")
        try:
            backend = ipaddress.IPv6Address(text if isinstance(text, str) else "")
        except ValueError:
            raise Refusal("bad_params", f"backend {text!r} is not an IPv6 address") from None
        raw = params.get("vip")
        selector = VipSelector.from_params(raw) if raw is not None else None
        changed: list[dict[str, Any]] = []
        save_error: str | None = None
        async with self._change_lock:
            config = self.fwd.config
            vips: list[VipConfig] = []
            selected = found = False
            for v in config.vips:
                if selector is not None and not selector.matches(
                    v.address.packed, v.port, v.protocol
                ):
                    vips.append(v)
                    continue
                selected = True
                backends: list[BackendConfig] = []
                for b in v.backends:
                    if b.address == backend:
                        found = True
                        new = edit(v, b)
                        if new != b:
                            changed.append(
                                {
                                    "vip": str(v),
                                    "backend": str(b.address),
                                    "weight": new.weight,
                                    "state": str(new.state),
                                }
                            )
                        b = new
                    backends.append(b)
                vips.append(replace(v, backends=tuple(backends)))
            if not selected:
                assert selector is not None
                raise Refusal("unknown_vip", self._no_vip(selector))
            if not found:
                where = f"VIP {selector}" if selector is not None else "any VIP"
                raise Refusal("unknown_backend", f"{backend} is not a backend of {where}")
            if changed:
                await replan(self.fwd, replace(config, vips=tuple(vips)))
                for c in changed:
                    log.info(
                        "%s: backend %s of %s now %s, weight %d (control API)",
                        method,
                        c["backend"],
                        c["vip"],
                        c["state"],
                        c["weight"],
                    )
            if self.fwd.worker == 0 and not params.get("local"):
                # One writer: worker 0, for the whole forwarder (the others apply in memory).
                # In a thread, still under the change lock: the fsyncs must not stall the loop.
                save_error = await asyncio.to_thread(self._save_overrides)
        answers, errors = await self._ask_peers(method, params)
        workers = [self.fwd.worker]
        for answer in answers:
            workers.extend(answer.get("workers", []))
        result: dict[str, Any] = {"changed": changed, "workers": workers, "errors": errors}
        if not params.get("local"):
            state_file = self.configured.control.state_file
            result["state_file"] = None if state_file is None else str(state_file)
            result["save_error"] = save_error
        return result

    async def _reload(self, params: dict[str, Any]) -> dict[str, Any]:
        """Re-read the config file here and on the other workers (as SIGHUP does)."""
        from forwarder.reload import reload_config

        result = await reload_config(self.fwd)
        error = result["error"]
        if error is not None:
            message = f"{error['field']}: {error['reason']}"
            raise Refusal("config_error", f"{message} (still running the previous config)")
        answers, errors = await self._ask_peers("reload", params)
        workers = [self.fwd.worker]
        for answer in answers:
            workers.extend(answer.get("workers", []))
        return {**result, "workers": workers, "errors": errors}


def _vip_key(v: VipConfig) -> tuple[bytes, int, int]:
    return (v.address.packed, v.port, int(v.protocol))


def _hostport(address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


async def start_operations(fwd: Forwarder) -> Operations:
    """Start the control API (and, on worker 0, the metrics endpoint) of a forwarder worker.

    Raises OSError(EADDRINUSE) when a live forwarder already serves the socket.
    """
    ops = Operations(fwd)
    await ops.start()
    return ops
