"""`flowstate explain`: what each layer would do with a flow's next packet, and why.

Layers, in the forwarder's order: its local flow table (asked over the control API), the store's
record (asked from the cluster, or through the forwarder), Maglev's choice now (computed here from
the forwarder's live backend list, or from its config file). `reason` turns those facts into the
decision and one paragraph; it is pure, so the unit tests cover every case.
"""

from __future__ import annotations

import argparse
import ipaddress
from dataclasses import asdict, dataclass, field
from typing import Any

from flowstate.cli_common import (
    EXIT_OK,
    CommandFailed,
    cluster_options,
    cluster_settings,
    config_option,
    connect_store,
    control_socket,
    duration,
    emit_json,
    five_tuple,
    five_tuple_arguments,
    json_option,
    load_forwarder_config,
    socket_option,
    wants_json,
)
from flowstate.cli_flows import key_text, now_ms, slot_nodes
from flowstate.control_client import ControlClient, ControlError, ControlUnavailable, VipSelector
from flowstate.errors import StoreUnavailable, UsageError
from flowstate.flow import FiveTuple, key_slot

#: Backends tried one by one in the "was one added later?" analysis (a table build each).
WHAT_IF_LIMIT = 32


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "explain",
        help="what each layer does with a flow, and why",
        description="What each layer would do with this flow's next packet: the running "
        "forwarder's local table (control API, if reachable), the store's record, Maglev's "
        "choice now (from the forwarder's backends, or from --config), and why.",
    )
    five_tuple_arguments(p)
    json_option(p)
    socket_option(p)
    config_option(p, "forwarder config file: VIPs and backends for Maglev, cluster seeds")
    cluster_options(p)
    p.set_defaults(run=run_explain)


@dataclass(frozen=True, slots=True)
class BackendView:
    address: str
    weight: int
    state: str  # active | draining


@dataclass(slots=True)
class Facts:
    """What the layers said about one flow. None where a layer could not be asked."""

    flow: str
    vip: str | None = None
    backends: list[BackendView] | None = None
    backends_source: str | None = None
    """``forwarder`` (live, with runtime changes) or ``config``."""
    local: list[dict[str, Any]] | None = None
    """Entries of the forwarder's workers (backend, state, expires_in_ms, worker); [] = miss."""
    local_note: str | None = None
    store: dict[str, Any] = field(default_factory=lambda: {"status": "unknown"})
    """status found|absent|unavailable|unknown; backend, pop, age_ms, ttl_ms when found."""
    maglev: str | None = None
    forwarder_maglev: str | None = None
    maglev_without: dict[str, str | None] = field(default_factory=dict)
    """Maglev's pick with one backend taken out: which addition would explain a difference."""


@dataclass(frozen=True, slots=True)
class Decision:
    backend: str | None
    layer: str  # local | store | maglev | none | unknown
    why: str


def reason(f: Facts) -> Decision:
    """The next (non-SYN) packet's backend, the layer that decides it, and why (one paragraph)."""
    parts: list[str] = []
    backend: str | None = None
    layer = "unknown"
    configured = {b.address: b for b in f.backends} if f.backends is not None else None

    # 1. The forwarder's local table.
    if f.local is None:
        parts.append("local table unknown (no forwarder asked)")
    else:
        live = [e for e in f.local if e.get("expires_in_ms", 1) > 0]
        if live:
            e = live[0]
            backend, layer = e["backend"], "local"
            note = " (closing: FIN/RST seen)" if e.get("state") == "closing" else ""
            parts.append(f"local table hit → {backend}{note}")
            others = {x["backend"] for x in live[1:]} - {backend}
            if others:
                parts.append(f"other workers hold {', '.join(sorted(others))}")
        elif f.local:
            parts.append("local entry expired (next packet misses)")
        else:
            parts.append("local table miss")

    # 2. The store.
    s = f.store
    status = s.get("status")
    if status == "found":
        stored = s["backend"]
        pinned = f"pinned by POP {s['pop']} {duration(s.get('age_ms'))} ago"
        valid = configured is None or stored in configured
        if layer == "local":
            if stored == backend:
                parts.append("store agrees")
            else:
                parts.append(
                    f"store says {stored} ({pinned}): the local entry wins here, other POPs "
                    f"would send to {stored}"
                )
        elif not valid:
            parts.append(
                f"store record names {stored}, which is not a backend of this VIP here: "
                "rejected (record_rejected)"
            )
        else:
            backend, layer = stored, "store"
            parts.append(f"store lookup finds {stored} ({pinned})")
    elif status == "absent":
        if layer == "local":
            parts.append("store has no record (not written yet, expired, or lost in a failover)")
        else:
            parts.append("store has no record")
    elif status == "unavailable":
        parts.append(f"store unavailable ({s.get('error', 'no answer')})")
    else:
        parts.append("store not asked")

    # 3. Maglev.
    if f.backends is None:
        parts.append("Maglev's choice unknown (no forwarder and no --config)")
        if layer not in ("local", "store"):
            layer = "unknown"
    elif layer not in ("local", "store"):
        backend, layer = f.maglev, ("maglev" if f.maglev else "none")
        if f.maglev is None:
            parts.append("no active backend: a flow start is dropped (drop_no_backend)")
        elif status in ("absent", "found"):
            parts.append(f"Maglev fallback picks {f.maglev} (and writes it back to the store)")
        else:
            parts.append(f"Maglev fallback picks {f.maglev}")
    elif f.maglev == backend:
        parts.append(f"Maglev would pick {backend} too")
    else:
        parts.append(_why_maglev_differs(f, backend, configured or {}))
    if f.forwarder_maglev is not None and f.maglev is not None and f.forwarder_maglev != f.maglev:
        parts.append(
            f"(the forwarder's own table picks {f.forwarder_maglev}: its backends differ from "
            f"the {f.backends_source} used here)"
        )
    why = "; ".join(parts) + "."
    return Decision(backend, layer, why[0].upper() + why[1:])


def _why_maglev_differs(f: Facts, pinned: str | None, configured: dict[str, BackendView]) -> str:
    now = f"Maglev would pick {f.maglev or 'no backend'} now"
    b = configured.get(pinned or "")
    if b is None:
        return f"{now}: {pinned} is not a backend of this VIP (any more)"
    if b.state == "draining":
        return f"{now} because {pinned} is draining (no new flows; pinned flows continue)"
    if b.weight == 0:
        return f"{now} because {pinned} has weight 0 (no new flows; pinned flows continue)"
    added = [x for x, pick in f.maglev_without.items() if pick == pinned]
    if added:
        if added == [f.maglev]:
            return f"{now} because backend {added[0]} was added after the flow started"
        return f"{now} because backend {added[0]} was added (or re-weighted) after the flow started"
    return f"{now}: the backend set or the weights changed after the flow started"


# --- gathering the facts -------------------------------------------------------------------------


def maglev_choice(
    backends: list[BackendView], size: int, hash64: int, without: str | None = None
) -> str | None:
    """Maglev's pick over the active, weighted backends (as the forwarder plans its table)."""
    from forwarder import maglev

    active = [
        (ipaddress.IPv6Address(b.address).packed, b.weight)
        for b in backends
        if b.state == "active" and b.weight > 0 and b.address != without
    ]
    if not active:
        return None
    got = maglev.MaglevTable.build(active, size).lookup(hash64)
    return None if got is None else str(ipaddress.IPv6Address(got))


async def _from_forwarder(args: argparse.Namespace, t: FiveTuple, facts: Facts) -> int | None:
    """Ask the forwarder; returns the VIP's Maglev size, or None if it is not reachable."""
    path = control_socket(args)
    try:
        client = await ControlClient.connect(path)
    except ControlUnavailable as exc:
        facts.local_note = exc.message
        return None
    async with client:
        try:
            answer = await client.flow(t)
        except ControlError as exc:
            if exc.code == "unknown_vip":
                raise UsageError(exc.message) from None
            raise CommandFailed(f"forwarder: {exc.message}") from None
        vips = await client.backends(VipSelector(t.vip, t.vip_port, t.proto))
    facts.vip = answer["vip"]
    facts.local = answer["local"]
    facts.forwarder_maglev = answer["maglev"]
    store = answer.get("store", {})
    if store.get("status") == "found":
        rec = store["record"]
        facts.store = {
            "status": "found",
            "via": "forwarder",
            "backend": rec["backend"],
            "pop": rec["pop"],
            "age_ms": now_ms() - rec["created_ms"],
            "ttl_ms": store.get("ttl_ms"),
        }
    elif store.get("status") in ("absent", "unavailable"):
        facts.store = {**store, "via": "forwarder"}
    (vip,) = vips["vips"]
    facts.backends = [BackendView(b["address"], b["weight"], b["state"]) for b in vip["backends"]]
    facts.backends_source = "forwarder"
    return vip["maglev_size"]


def _from_config(config: Any, t: FiveTuple, facts: Facts) -> int:
    for v in config.vips:
        if v.address.packed == t.vip_ip and v.port == t.vip_port and v.protocol == t.proto:
            facts.vip = str(v)
            facts.backends = [
                BackendView(str(b.address), b.weight, str(b.state)) for b in v.backends
            ]
            facts.backends_source = "config"
            size: int = v.maglev_size
            return size
    known = ", ".join(str(v) for v in config.vips)
    vip = f"{t.proto.name.lower()} {t.vip}:{t.vip_port}"
    raise UsageError(f"{vip} is not a VIP in the --config file (VIPs: {known})")


async def _from_store(settings: Any, t: FiveTuple, facts: Facts) -> dict[str, Any]:
    where: dict[str, Any] = {"key": key_text(t.key()), "slot": key_slot(t.key())}
    try:
        store = await connect_store(settings)
    except StoreUnavailable as exc:
        facts.store = {"status": "unavailable", "error": str(exc)}
        return where
    try:
        (rec,) = await store.lookup_many([t])
        ttl = await store.ttl_ms(t) if rec is not None else None
        nodes = slot_nodes(store, where["slot"])
        where["master"] = nodes[0] if nodes else None
    except StoreUnavailable as exc:
        facts.store = {"status": "unavailable", "error": str(exc)}
        return where
    finally:
        await store.close()
    if rec is None:
        facts.store = {"status": "absent", "via": "cluster"}
    else:
        facts.store = {
            "status": "found",
            "via": "cluster",
            "backend": str(rec.backend),
            "pop": rec.pop,
            "age_ms": now_ms() - rec.created_ms,
            "ttl_ms": ttl,
        }
    return where


async def run_explain(args: argparse.Namespace) -> int:
    t = five_tuple(args)
    config = load_forwarder_config(args.config)
    facts = Facts(flow=str(t))
    size = await _from_forwarder(args, t, facts)
    if size is None and config is not None:
        size = _from_config(config, t, facts)
    settings = cluster_settings(args, config)
    where: dict[str, Any] = {"key": key_text(t.key()), "slot": key_slot(t.key())}
    if settings is not None:
        where = await _from_store(settings, t, facts)
    if facts.local is None and facts.backends is None and settings is None:
        raise CommandFailed(
            f"nothing to ask: {facts.local_note}; no cluster (--seeds) and no --config"
        )
    if facts.backends is not None and size is not None:
        facts.maglev = maglev_choice(facts.backends, size, t.hash64())
        pinned = _pinned(facts)
        if pinned is not None and pinned != facts.maglev:
            candidates = [b for b in facts.backends if b.address != pinned][:WHAT_IF_LIMIT]
            for b in candidates:
                if b.state == "active" and b.weight > 0:
                    facts.maglev_without[b.address] = maglev_choice(
                        facts.backends, size, t.hash64(), without=b.address
                    )
    decision = reason(facts)
    if wants_json(args):
        out = asdict(facts)
        out.update(where)
        out["decision"] = asdict(decision)
        emit_json(out)
    else:
        print(format_explain(facts, decision, where))
    return EXIT_OK


def _pinned(f: Facts) -> str | None:
    if f.local:
        live = [e for e in f.local if e.get("expires_in_ms", 1) > 0]
        if live:
            backend: str = live[0]["backend"]
            return backend
    if f.store.get("status") == "found":
        stored: str = f.store["backend"]
        return stored
    return None


def format_explain(f: Facts, d: Decision, where: dict[str, Any]) -> str:
    lines = [f"flow      {f.flow}"]
    key = f"key       {where['key']}  slot {where['slot']}"
    if where.get("master"):
        key += f" on {where['master']}"
    lines.append(key)
    if f.backends is not None:
        listed = ", ".join(
            f"{b.address} ({b.weight}{', draining' if b.state != 'active' else ''})"
            for b in f.backends
        )
        lines.append(f"vip       {f.vip}: {listed}  [from the {f.backends_source}]")
    if f.local is None:
        lines.append(f"local     unknown: {f.local_note}")
    elif not f.local:
        lines.append("local     no entry")
    else:
        for e in f.local:
            lines.append(
                f"local     {e['backend']}, {e['state']}, expires in "
                f"{duration(e['expires_in_ms'])} (worker {e['worker']})"
            )
    s = f.store
    if s["status"] == "found":
        lines.append(
            f"store     {s['backend']}, pinned by {s['pop']} {duration(s['age_ms'])} ago, "
            f"TTL {duration(s['ttl_ms'])} left"
        )
    elif s["status"] == "absent":
        lines.append("store     no record")
    elif s["status"] == "unavailable":
        lines.append(f"store     unavailable: {s.get('error')}")
    else:
        lines.append("store     not asked (no --seeds, no forwarder)")
    if f.backends is not None:
        lines.append(f"maglev    {f.maglev or 'no backend'} now")
    target = d.backend or "dropped"
    lines.append(f"next      {target} ({d.layer})")
    lines.append(f"why       {d.why}")
    return "\n".join(lines)
