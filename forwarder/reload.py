"""Config reload (SIGHUP, control API ``reload``): apply what can change live, report the rest.

VIPs and backends (added, removed, weights, states), health checks and the slow path's store
limits change live, through `control.replan` (the path of drain): flows to backends still
configured are untouched; flows of a removed backend or VIP are dropped from the local table
(their next packet is looked up, and the record naming a backend no longer configured is
rejected: Maglev decides). Settings read once at start-up are reported as needing a restart and
keep their running value. An invalid file changes nothing. Runtime changes (drain, weight) stay
over the file's values (forwarder.overrides), except those of backends no longer configured and
those the file now agrees with.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from flowstate.errors import ConfigError
from forwarder import overrides
from forwarder.config import ForwarderConfig, VipConfig, load_config

if TYPE_CHECKING:
    from forwarder.service import Forwarder

log = logging.getLogger("flowstate.forwarder")

#: Top-level settings a reload applies. Every other one (interfaces, workers, impl, source
#: address, timeouts, flow table, control socket, ...) is read at start-up only; so is any setting
#: added later unless it is listed here.
LIVE_FIELDS = ("vips", "health", "store")
#: Store settings the slow path reads live; the others belong to the store client.
LIVE_STORE_FIELDS = ("lookup_patience_ms", "max_writes_per_s", "fallback")


def _differences(name: str, old: Any, new: Any) -> list[str]:
    """Dotted names of the fields that differ between two values of setting `name`."""
    if old == new:
        return []
    if dataclasses.is_dataclass(old) and not isinstance(old, type):
        return [
            f"{name}.{f.name}"
            for f in dataclasses.fields(old)
            if getattr(old, f.name) != getattr(new, f.name)
        ]
    return [name]


def merge(running: ForwarderConfig, loaded: ForwarderConfig) -> tuple[ForwarderConfig, list[str]]:
    """The config to run after reading `loaded`: its live settings, the running value of the
    others; and the names of those that changed but need a restart."""
    needs: list[str] = []
    kept: dict[str, Any] = {}
    for name in (f.name for f in dataclasses.fields(running) if f.name not in LIVE_FIELDS):
        old, new = getattr(running, name), getattr(loaded, name)
        if old != new:
            needs.extend(_differences(name, old, new))
            kept[name] = old
    live = {f: getattr(loaded.store, f) for f in LIVE_STORE_FIELDS}
    running_live = {f: getattr(running.store, f) for f in LIVE_STORE_FIELDS}
    needs.extend(_differences("store", running.store, replace(loaded.store, **running_live)))
    return replace(loaded, store=replace(running.store, **live), **kept), needs


def _vip_key(v: VipConfig) -> tuple[bytes, int, int]:
    return (v.address.packed, v.port, int(v.protocol))


def describe(old: ForwarderConfig, new: ForwarderConfig) -> list[str]:
    """What a reload from `old` to `new` changes, one line each (for the log and the answer)."""
    out: list[str] = []
    before = {_vip_key(v): v for v in old.vips}
    after = {_vip_key(v): v for v in new.vips}
    for key, v in after.items():
        o = before.get(key)
        if o is None:
            out.append(f"VIP {v} added with {len(v.backends)} backends")
            continue
        if o.maglev_size != v.maglev_size:
            out.append(f"{v}: maglev_size {o.maglev_size} -> {v.maglev_size}")
        was = {b.address: b for b in o.backends}
        now = {b.address: b for b in v.backends}
        for addr, b in now.items():
            p = was.get(addr)
            if p is None:
                out.append(f"{v}: backend {addr} added ({b.state}, weight {b.weight})")
                continue
            for f in ("state", "weight", "check_address"):
                a, z = getattr(p, f), getattr(b, f)
                if a != z:
                    out.append(f"{v}: backend {addr} {f} {a} -> {z}")
        out.extend(f"{v}: backend {addr} removed" for addr in was if addr not in now)
    out.extend(f"VIP {v} removed" for key, v in before.items() if key not in after)
    out.extend(f"{name} changed" for name in _differences("health", old.health, new.health))
    for f in LIVE_STORE_FIELDS:
        a, z = getattr(old.store, f), getattr(new.store, f)
        if a != z:
            out.append(f"store.{f} {a} -> {z}")
    return out


async def reload_config(fwd: Forwarder) -> dict[str, Any]:
    """Re-read `fwd.config_path` and apply it. Never raises for a bad file: the answer's
    `error` names the field and the old config keeps running."""
    path = fwd.config_path
    answer: dict[str, Any] = {
        "path": None if path is None else str(path),
        "applied": False,
        "changes": [],
        "needs_restart": [],
        "error": None,
    }
    if path is None:
        answer["error"] = {"field": "(none)", "reason": "not started from a config file"}
        return answer
    try:
        loaded = await asyncio.to_thread(load_config, path)
    except ConfigError as exc:
        log.error(
            "reload: %s: %s: %s; still running the previous config", path, exc.field, exc.reason
        )
        answer["error"] = {"field": exc.field, "reason": exc.reason}
        return answer
    async with fwd.change_lock:
        configured, needs = merge(fwd.config, loaded)
        # The runtime overrides (state file) go back over the file's values.
        running = overrides.diff(fwd.configured, fwd.config, {})
        config, _ = overrides.reapply(configured, writer=fwd.worker == 0, running=running)
        changes = describe(fwd.config, config)
        try:
            await apply_config(fwd, config)
        except Exception as exc:  # a bug; the SIGHUP path has nobody else to tell
            log.exception("reload: applying %s failed", path)
            answer["error"] = {"field": "(apply)", "reason": f"{type(exc).__name__}: {exc}"}
            return answer
        fwd.configured = configured
    for line in changes:
        log.info("reload: %s", line)
    if needs:
        log.warning(
            "reload: needs a restart to take effect (kept as running): %s", ", ".join(needs)
        )
    log.info("reload: %s applied (%d changes)", path, len(changes))
    answer.update(applied=True, changes=changes, needs_restart=needs)
    return answer


async def apply_config(fwd: Forwarder, config: ForwarderConfig) -> None:
    """Make `config` (already merged: nothing that needs a restart differs) live."""
    from forwarder.control import replan

    neighbours = fwd._neighbours  # the driver's neighbour cache: new backends need next hops
    before = set(fwd.plan.backend_ids)
    changed: dict[bytes, Any] = {}
    if neighbours is not None:
        neighbours.set_addresses(sorted({b.address for v in config.vips for b in v.backends}))
        try:
            # Before the new Maglev tables: a new backend must have its link when picked.
            changed = await neighbours.refresh()
        except OSError as exc:
            log.warning("reload: neighbour refresh failed (retried in the background): %s", exc)
    fwd.health.configure(config)
    await replan(fwd, config, down=fwd.health.down(), dead=fwd.health.dead())
    if neighbours is not None:
        # The cache's links as they are now, not as the refresh above found them: meanwhile
        # (replan waits for its thread) the background refresh may have resolved a new backend,
        # a change it could not hand over then (the plan had no id for it yet) and will not
        # report again. Handing over the older "unresolved" left it without a next hop.
        links = neighbours.links()
        new = [ip for ip in fwd.plan.backend_ids if ip not in before]
        fwd._on_links({ip: links[ip] for ip in [*new, *changed] if ip in links})
    s = config.store
    fwd.core.config = replace(
        fwd.core.config,
        lookup_patience_ms=int(s.lookup_patience_ms),
        max_writes_per_s=s.max_writes_per_s,
        fallback=s.fallback,
    )
