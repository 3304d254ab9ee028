"""Runtime backend overrides (`flowstate backends drain|undrain|weight|reset`), kept in a state
file so that they outlive a reload (SIGHUP, `flowstate reload`) and a restart.

An override is what the running config says about one backend of one VIP that the config file
does not: its state, its weight, or both. The state file holds exactly the running config minus
the configured one (`diff`), rewritten after every change: a change that brings a backend back
to its configured values (`undrain` of a backend the file has active, `weight --reset`,
`reset`) removes its entry. On start and on reload the overrides are laid over the file's
config again (`apply`): an override of a backend or VIP the file no longer has is dropped with
a warning, and so is a field the file now agrees with (the file caught up: from then on the file
decides, so a later edit of the file is not masked by a stale override).

One writer: worker 0, which answers the control API and fans changes out to the other workers
(they apply them in memory and only read the file, at start and reload). The writes are atomic
(temporary file, fsync, rename, fsync of the directory): a reader sees the old file or the new.

A corrupt or unreadable file must not stop an anycast forwarder from forwarding: it starts (or
reloads) without the file's overrides, says so at error level, and worker 0 moves the file aside
to ``<file>.bad`` for a human to look at (on a reload the overrides running in memory are kept
and written back instead). With `user`, the file lives in a directory of its own that the
supervisor gives to the user at start (`give_directory`), as it does the control socket's.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forwarder import maglev, privileges
from forwarder.config import BackendState, ForwarderConfig, VipConfig

if TYPE_CHECKING:
    from forwarder.privileges import Identity

log = logging.getLogger("flowstate.forwarder")

#: Format version of the state file.
VERSION = 1

#: (packed VIP address, port, IANA protocol number) of a VIP.
VipKey = tuple[bytes, int, int]
#: An override's key: the VIP and the backend's address.
Key = tuple[VipKey, ipaddress.IPv6Address]


@dataclass(frozen=True, slots=True)
class Override:
    """What runs instead of the config file's values; None: the file's."""

    state: BackendState | None = None
    weight: int | None = None
    changed_at: float = 0.0
    """Unix time of the change (for humans reading the file)."""

    @property
    def empty(self) -> bool:
        return self.state is None and self.weight is None

    def same(self, other: Override) -> bool:
        return (self.state, self.weight) == (other.state, other.weight)


Overrides = dict[Key, Override]


class StateFileError(Exception):
    """The state file cannot be read or is not a valid overrides file."""


def vip_key(v: VipConfig) -> VipKey:
    return (v.address.packed, v.port, int(v.protocol))


def describe_key(key: Key) -> str:
    (packed, port, proto), backend = key
    address = ipaddress.ip_address(packed)
    host = f"[{address}]" if address.version == 6 else str(address)
    name = {6: "tcp", 17: "udp"}.get(proto, str(proto))
    return f"backend {backend} of {name} {host}:{port}"


# ---- pure logic -----------------------------------------------------------------------------


def diff(configured: ForwarderConfig, running: ForwarderConfig, previous: Overrides) -> Overrides:
    """The overrides that make `configured` into `running` (VIPs and backends of both); the
    `changed_at` of an unchanged one is kept from `previous`, a new one gets now."""
    now = time.time()
    base = {(vip_key(v), b.address): b for v in configured.vips for b in v.backends}
    out: Overrides = {}
    for v in running.vips:
        for b in v.backends:
            key = (vip_key(v), b.address)
            orig = base.get(key)
            if orig is None:
                continue
            o = Override(
                state=b.state if b.state != orig.state else None,
                weight=b.weight if b.weight != orig.weight else None,
            )
            if o.empty:
                continue
            old = previous.get(key)
            out[key] = replace(o, changed_at=old.changed_at if old and old.same(o) else now)
    return out


def apply(
    configured: ForwarderConfig, overrides: Overrides
) -> tuple[ForwarderConfig, Overrides, list[str]]:
    """`configured` with `overrides` laid over it; the overrides that still override something;
    and why the others were dropped (one line each, for the log)."""
    kept: Overrides = {}
    dropped: list[str] = []
    backends = {(vip_key(v), b.address) for v in configured.vips for b in v.backends}
    for key in overrides:
        if key not in backends:
            dropped.append(f"{describe_key(key)}: no longer in the config; override dropped")
    vips: list[VipConfig] = []
    for v in configured.vips:
        new_backends = []
        for b in v.backends:
            key = (vip_key(v), b.address)
            o = overrides.get(key)
            if o is not None:
                state = o.state if o.state is not None and o.state != b.state else None
                weight = o.weight if o.weight is not None and o.weight != b.weight else None
                caught = [
                    f"{name} {value}"
                    for name, value, left in (
                        ("state", o.state, state),
                        ("weight", o.weight, weight),
                    )
                    if value is not None and left is None
                ]
                if caught:
                    dropped.append(
                        f"{describe_key(key)}: the config now has the override's "
                        f"{' and '.join(caught)}; override dropped, the config decides"
                    )
                o = replace(o, state=state, weight=weight)
                if not o.empty:
                    kept[key] = o
                    b = replace(
                        b,
                        state=o.state if o.state is not None else b.state,
                        weight=o.weight if o.weight is not None else b.weight,
                    )
            new_backends.append(b)
        vips.append(replace(v, backends=tuple(new_backends)))
    if not kept:
        return configured, kept, dropped  # the config itself, as before overrides existed
    return replace(configured, vips=tuple(vips)), kept, dropped


def encode(overrides: Overrides) -> bytes:
    entries: list[dict[str, Any]] = []
    for key in sorted(overrides, key=lambda k: (k[0], k[1].packed)):
        (packed, port, proto), backend = key
        o = overrides[key]
        entry: dict[str, Any] = {
            "vip": {
                "address": str(ipaddress.ip_address(packed)),
                "port": port,
                "protocol": {6: "tcp", 17: "udp"}[proto],
            },
            "backend": str(backend),
        }
        if o.state is not None:
            entry["state"] = str(o.state)
        if o.weight is not None:
            entry["weight"] = o.weight
        entry["changed_at"] = round(o.changed_at, 3)
        entries.append(entry)
    doc = {"version": VERSION, "overrides": entries}
    return (json.dumps(doc, indent=2) + "\n").encode()


def decode(data: bytes) -> Overrides:
    """Parse a state file; StateFileError naming what is wrong."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise StateFileError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        raise StateFileError(f"not a version {VERSION} overrides file")
    entries = doc.get("overrides")
    if not isinstance(entries, list):
        raise StateFileError("'overrides' is not a list")
    out: Overrides = {}
    for i, e in enumerate(entries):
        try:
            key, o = _entry(e)
        except KeyError as exc:
            raise StateFileError(f"overrides[{i}]: missing or unknown {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise StateFileError(f"overrides[{i}]: {exc}") from None
        if key in out:
            raise StateFileError(f"overrides[{i}]: {describe_key(key)} listed twice")
        out[key] = o
    return out


def _entry(e: Any) -> tuple[Key, Override]:
    if not isinstance(e, dict) or not isinstance(e["vip"], dict):
        raise TypeError("not an object with a 'vip' object")
    vip = e["vip"]
    address = ipaddress.ip_address(vip["address"])
    port = vip["port"]
    if type(port) is not int or not 1 <= port <= 65535:
        raise ValueError(f"port {port!r}")
    proto = {"tcp": 6, "udp": 17}[vip["protocol"]]
    backend = ipaddress.IPv6Address(e["backend"])
    state = BackendState(e["state"]) if "state" in e else None
    weight = e.get("weight")
    if weight is not None and (type(weight) is not int or not 0 <= weight <= maglev.MAX_WEIGHT):
        raise ValueError(f"weight {weight!r}")
    changed_at = e.get("changed_at", 0.0)
    if type(changed_at) not in (int, float):
        raise ValueError(f"changed_at {changed_at!r}")
    o = Override(state=state, weight=weight, changed_at=float(changed_at))
    if o.empty:
        raise ValueError("neither state nor weight")
    return ((address.packed, port, proto), backend), o


# ---- the file -------------------------------------------------------------------------------


def load(path: Path) -> Overrides:
    """The overrides in `path` ({} if there is no file); StateFileError if unreadable/bad."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise StateFileError(f"cannot read it: {exc.strerror or exc}") from None
    return decode(data)


def save(path: Path, overrides: Overrides) -> None:
    """Write `overrides` to `path` atomically (temp file, fsync, rename, fsync the directory);
    the directory is created (0700) if missing. OSError if it cannot be written."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.write(fd, encode(overrides))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def set_aside(path: Path) -> Path | None:
    """Move a bad state file to ``<file>.bad`` (replacing an older one); its new path, or None
    if it could not be moved (logged)."""
    bad = path.with_name(path.name + ".bad")
    try:
        os.rename(path, bad)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.error("overrides: cannot move %s aside to %s: %s", path, bad, exc.strerror or exc)
        return None
    return bad


def reapply(
    configured: ForwarderConfig,
    *,
    writer: bool,
    running: Overrides | None = None,
) -> tuple[ForwarderConfig, Overrides]:
    """The config to run: `configured` (the file's, at start or reload) with the state file's
    overrides over it, and those overrides. `writer` (worker 0) also sets a bad file aside and
    rewrites the file when overrides were dropped. `running`: the overrides in memory (a
    reload), used instead of a bad file. Never raises for the state file: it logs."""
    path = configured.control.state_file
    if path is None:
        return configured, {}  # in memory only: the file's values are what a reload applies
    rewrite = False
    try:
        overrides = load(path)
    except StateFileError as exc:
        what = "the overrides running now" if running else "no runtime overrides"
        log.error(
            "overrides: state file %s is unusable (%s); going on with %s: "
            "check `flowstate backends ls` and drain again what must stay drained",
            path,
            exc,
            what,
        )
        if writer:
            bad = set_aside(path)
            if bad is not None:
                log.error("overrides: the unusable state file is kept as %s", bad)
        overrides, rewrite = dict(running or {}), True
    config, kept, dropped = apply(configured, overrides)
    for line in dropped:
        log.warning("overrides: %s", line)
    for key, o in sorted(kept.items(), key=lambda i: (i[0][0], i[0][1].packed)):
        fields = [f"state {o.state}"] if o.state is not None else []
        fields += [f"weight {o.weight}"] if o.weight is not None else []
        log.info(
            "overrides: %s runs with %s (runtime override)", describe_key(key), ", ".join(fields)
        )
    if writer and (dropped or (rewrite and kept)):
        try:
            save(path, kept)
        except OSError as exc:
            log.error("overrides: cannot write %s: %s", path, exc.strerror or exc)
    return config, kept


def give_directory(path: Path, identity: Identity) -> None:
    """Make the state file's directory `identity`'s (0700) so that a worker running as the
    configured user can replace the file (``<file>``, ``.tmp.*``, ``.bad``): see
    `forwarder.privileges.give_directory`."""
    privileges.give_directory(path, identity, "state file", "control.state_file")
