"""The forwarder's TOML configuration, parsed and validated into frozen dataclasses.

Every problem is a `ConfigError` whose `field` is the dotted path of the offending key
(``vip[1].backend[0].address``) and whose reason says what is wrong in network terms.
"""

from __future__ import annotations

import difflib
import enum
import hmac
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from flowstate.errors import ConfigError
from flowstate.flow import Proto
from flowstate.store.base import ReplicaReads
from forwarder import maglev

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Longest POP id, in bytes (the flow record stores it; see flowstate.record).
MAX_POP_LEN = 32
#: VIPs per forwarder: the data path numbers them 0..255.
MAX_VIPS = 256
#: Longest Unix socket path (sun_path is 108 bytes including the NUL).
MAX_SOCKET_PATH = 107
#: Idle timeouts above a day are almost always milliseconds written into a seconds field.
MAX_TIMEOUT_S = 86400.0

_POP_RE = re.compile(r"[A-Za-z0-9_.-]+")
_ENV_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HOSTNAME_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


class Impl(enum.StrEnum):
    """Which data path implementation runs."""

    C = "c"
    PYTHON = "python"


class StoreKind(enum.StrEnum):
    REDIS_CLUSTER = "redis-cluster"
    MEMORY = "memory"


class BackendState(enum.StrEnum):
    ACTIVE = "active"
    DRAINING = "draining"


class HealthKind(enum.StrEnum):
    TCP = "tcp"
    HTTP = "http"
    NONE = "none"


class BgpKind(enum.StrEnum):
    """How the VIPs are announced: through BIRD 2, or not by the forwarder at all."""

    BIRD = "bird"
    NONE = "none"


class Secret:
    """A password that never shows itself in repr, str or logs; `reveal()` to use it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(Secret)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A TCP endpoint written as ``host:port`` or ``[ipv6]:port``."""

    host: str
    """Hostname, IPv4 address or IPv6 address (without brackets)."""
    port: int
    """1..65535."""

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeoutsConfig:
    tcp_idle_s: float = 300.0
    """A TCP flow with no packet for this long is forgotten locally."""
    udp_idle_s: float = 30.0
    """A UDP flow with no packet for this long is forgotten locally."""
    fin_linger_s: float = 10.0
    """After FIN or RST a flow lives this much longer (late retransmits, the last ACK)."""
    store_ttl_s: float = 300.0
    """TTL of a pinning in the store. The TOML loader defaults it to `tcp_idle_s`; an active
    flow refreshes it once per quarter TTL (`store_refresh_ms`)."""

    @property
    def tcp_idle_ms(self) -> int:
        return round(self.tcp_idle_s * 1000)

    @property
    def udp_idle_ms(self) -> int:
        return round(self.udp_idle_s * 1000)

    @property
    def fin_linger_ms(self) -> int:
        return round(self.fin_linger_s * 1000)

    @property
    def store_ttl_ms(self) -> int:
        return round(self.store_ttl_s * 1000)

    @property
    def store_refresh_ms(self) -> int:
        return round(self.store_ttl_s * 250)


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreConfig:
    kind: StoreKind = StoreKind.MEMORY
    """``redis-cluster`` (shared across POPs) or ``memory`` (this process only: tests, labs).
    Default: ``redis-cluster`` when `seeds` are given, else ``memory``."""
    seeds: tuple[Endpoint, ...] = ()
    """Some Redis Cluster nodes to discover the cluster from."""
    username: str | None = None
    """Redis ACL user; None for the default user."""
    password: Secret | None = None
    """Password written inline in the file (prefer `password_file` or `password_env`)."""
    password_file: Path | None = None
    """File holding the password (one line; a trailing newline is ignored). Read at start-up."""
    password_env: str | None = None
    """Environment variable holding the password. Read at start-up."""
    tls: bool = False
    """Talk TLS to the cluster nodes."""
    tls_ca_file: Path | None = None
    """CA bundle to verify the nodes; None for the system store."""
    tls_cert_file: Path | None = None
    """Client certificate (with `tls_key_file`) for mutual TLS."""
    tls_key_file: Path | None = None
    """Private key of `tls_cert_file`."""
    lookup_deadline_ms: float = 5.0
    """A lookup slower than this counts as a failure (Maglev fallback if `fallback`)."""
    lookup_patience_ms: float = 100.0
    """How long a packet of an unknown flow may wait for the store before Maglev decides.

    A lookup that fails (deadline, store down) is retried while the flow's first packet is
    younger than this: a late packet costs latency, a wrong fallback after a backend change
    costs the connection. 0 falls back at the first failure."""
    write_deadline_ms: float = 50.0
    """A pinning write slower than this is abandoned and counted."""
    max_writes_per_s: int = 50000
    """Cap on store writes, so a SYN flood does not become a write flood."""
    fallback: bool = True
    """On store failure pick the backend by Maglev rather than dropping the packet."""
    read_from_replicas: ReplicaReads = ReplicaReads.ON_FAILURE
    """``on-failure``: lookups of the slots of a master that is down, cut off or stalled are
    read from one of its replicas (READONLY) until it answers again; ``off``: only masters
    answer, so that master's flows fall back. Never used for writes."""

    def read_password(self, environ: Mapping[str, str] | None = None) -> Secret | None:
        """The password from whichever source is configured; ConfigError if it cannot be read."""
        if self.password is not None:
            return self.password
        if self.password_env is not None:
            env = os.environ if environ is None else environ
            value = env.get(self.password_env)
            if value is None:
                raise ConfigError("store.password_env", f"${self.password_env} is not set")
            if not value:
                raise ConfigError("store.password_env", f"${self.password_env} is empty")
            return Secret(value)
        if self.password_file is not None:
            try:
                text = self.password_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                reason = getattr(exc, "strerror", None) or type(exc).__name__
                raise ConfigError(
                    "store.password_file", f"cannot read {self.password_file}: {reason}"
                ) from None
            value = text.removesuffix("\n").removesuffix("\r")
            if not value or "\n" in value:
                raise ConfigError(
                    "store.password_file",
                    f"{self.password_file} must hold the password on one non-empty line",
                )
            return Secret(value)
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class FlowTableConfig:
    capacity: int = 1_000_000
    """Most flows held locally; beyond it the oldest idle flows are evicted."""
    miss_queue_per_flow: int = 8
    """Packets held per flow while its store lookup is in flight; extras are dropped."""
    miss_queue_total: int = 10000
    """Packets held across all flows waiting for store lookups."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendConfig:
    address: ipaddress.IPv6Address
    """Unicast IPv6 address: the outer destination of the tunnel."""
    weight: int = 100
    """Relative share of new flows, 0..65535; 0 takes no new flows."""
    state: BackendState = BackendState.ACTIVE
    """``draining`` keeps existing pinnings but takes no new flows."""
    check_address: IPAddress | None = None
    """Where health checks connect (IPv4 or IPv6); None: `address`. Set it when `address` is
    not a local address of the backend (seg6local decapsulation routes it, no socket owns it)."""

    @property
    def check_target(self) -> IPAddress:
        """The address health checks connect to."""
        return self.address if self.check_address is None else self.check_address


@dataclass(frozen=True, slots=True, kw_only=True)
class VipConfig:
    address: IPAddress
    """The anycast service address (IPv4 or IPv6)."""
    port: int
    """1..65535."""
    protocol: Proto
    """TCP or UDP."""
    maglev_size: int = maglev.DEFAULT_SIZE
    """Maglev table size: a prime larger than the number of backends (ideally 100x)."""
    backends: tuple[BackendConfig, ...] = ()
    """At least one; addresses unique within the VIP."""
    udp_lookup_first: bool = True
    """UDP only: the first datagram of a flow unknown to this POP waits for a store lookup
    (one round trip) instead of starting the flow on Maglev's choice, so that a flow moved here
    by a route change keeps its backend even after a backend change."""

    def __str__(self) -> str:
        a = self.address
        host = f"[{a}]" if a.version == 6 else str(a)
        return f"{self.protocol.name.lower()} {host}:{self.port}"

    def maglev_backends(self) -> list[tuple[bytes, int]]:
        """`maglev.build_table` input: every backend, draining ones with weight 0 (no new flows,
        stable indices)."""
        return [
            (b.address.packed, 0 if b.state is BackendState.DRAINING else b.weight)
            for b in self.backends
        ]


@dataclass(frozen=True, slots=True, kw_only=True)
class ControlConfig:
    socket: Path = Path("/run/flowstate/forwarder.sock")
    """Unix socket of the control API (used by the `flowstate` CLI)."""
    metrics: Endpoint | None = Endpoint("127.0.0.1", 9412)
    """Where Prometheus metrics are served; None (``""`` in TOML) disables them."""
    state_file: Path | None = Path("/var/lib/flowstate/overrides/backends.json")
    """Where runtime backend changes (`flowstate backends drain|undrain|weight`) are kept, so
    that they outlive reloads and restarts (forwarder.overrides); in a directory of its own
    (given to `user`). None (``""`` in TOML) keeps them in memory only, until a reload."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthConfig:
    kind: HealthKind = HealthKind.TCP
    """``tcp`` (connect), ``http`` (GET `path`, expect 2xx or 3xx) or ``none``. Without a
    [health] section no checks run (``none``)."""
    interval_ms: int = 1000
    """Time between checks of one backend."""
    timeout_ms: int = 500
    """A check slower than this fails; at most `interval_ms`."""
    rise: int = 2
    """Consecutive successes that make a down backend healthy."""
    fall: int = 3
    """Consecutive failures that take a healthy backend out."""
    port: int | None = None
    """Port checked on the backend's address; None for the VIP's port."""
    path: str = "/"
    """Request path of ``http`` checks."""
    repin_after_ms: int | None = None
    """Flows pinned to a backend that stays down this long are moved to a healthy one (they
    keep going to it before: a short outage must not break them); None: 10 x `interval_ms`."""

    @property
    def repin_after(self) -> int:
        """`repin_after_ms` with its default applied."""
        return 10 * self.interval_ms if self.repin_after_ms is None else self.repin_after_ms


@dataclass(frozen=True, slots=True, kw_only=True)
class BgpConfig:
    kind: BgpKind = BgpKind.NONE
    """``bird``: announce the VIPs only while this forwarder can forward, by enabling and
    disabling BIRD static protocols that hold the VIP routes; ``none``: BGP is not our job."""
    birdc: str = "birdc"
    """The birdc binary: a path, or a name looked up on $PATH."""
    socket: Path = Path("/run/bird/bird.ctl")
    """BIRD's control socket."""
    protocols: tuple[str, ...] = ("vip4", "vip6")
    """BIRD static protocols holding the VIP routes; enabled = announced. Declare them
    ``disabled yes`` in bird.conf so that BIRD announces nothing before the forwarder says so."""
    check_interval_ms: int = 200
    """Time between health checks; one failed check withdraws."""
    announce_delay_ms: int = 1000
    """Health must hold this long before the VIPs are (re-)announced, so that a crash-looping
    worker does not flap the route."""
    stall_timeout_ms: int = 1000
    """A worker whose event loop has not reported for this long counts as failed (a worker that
    exits counts at once)."""
    withdraw_on_store_loss: bool = False
    """Withdraw while the store is unreachable, even with `store.fallback` on (without fallback
    losing the store always withdraws)."""
    drain_file: Path | None = Path("/var/lib/flowstate/pop-drained")
    """Where `flowstate drain-pop` records the drain, so that it outlives forwarder restarts
    until `flowstate undrain-pop`; None (``""`` in TOML) keeps it in memory only."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ForwarderConfig:
    pop: str
    """This POP's id (1..32 of A-Z a-z 0-9 _ . -), written into every pinning it makes."""
    interfaces: tuple[str, ...]
    """Interfaces that receive the VIPs' packets."""
    source_ipv6: ipaddress.IPv6Address
    """The forwarder's own unicast IPv6 address: the tunnels' outer source."""
    workers: int = 1
    """Worker processes (AF_PACKET fanout members)."""
    impl: Impl = Impl.C
    """Data path: ``c`` (the fast path) or ``python`` (the reference)."""
    ingress_drop: bool = True
    """Drop the VIPs' frames in an nftables netdev ingress hook after the forwarder's packet tap
    has them, so the host's IP stack does not process them too (needs ``nft``)."""
    drop_capabilities: bool = True
    """Workers keep only CAP_NET_RAW and CAP_NET_ADMIN (bounding set included) once they start:
    whatever the data path might be made to do, it cannot use root's other powers. Files a
    worker reads later (password, TLS key, the config on reload) must then be readable by
    root without CAP_DAC_OVERRIDE: owned by root, or readable by it."""
    user: str | None = None
    """Workers run as this user (not root) once their code is loaded, keeping CAP_NET_RAW and
    CAP_NET_ADMIN only; a root supervisor keeps what needs root (nftables, BGP, restarting
    workers), so even one worker runs under it. The user must exist on this host; it must be
    able to read the config file (reload), the password and TLS files, and it is given the
    control socket's directory. None: workers stay root (see `drop_capabilities`)."""
    group: str | None = None
    """The workers' group with `user`; None: the user's primary group. Supplementary groups
    are the user's (/etc/group) either way."""
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    flow_table: FlowTableConfig = field(default_factory=FlowTableConfig)
    vips: tuple[VipConfig, ...] = ()
    """The services, from the ``[[vip]]`` tables."""
    control: ControlConfig = field(default_factory=ControlConfig)
    health: HealthConfig = field(default_factory=lambda: HealthConfig(kind=HealthKind.NONE))
    bgp: BgpConfig = field(default_factory=BgpConfig)

    def summary(self) -> str:
        """One paragraph for humans (``--check-config``, start-up log)."""
        backends = sum(len(v.backends) for v in self.vips)
        draining = sum(b.state is BackendState.DRAINING for v in self.vips for b in v.backends)
        store = f"store {self.store.kind}"
        if self.store.kind is StoreKind.REDIS_CLUSTER:
            seeds = len(self.store.seeds)
            store += f" ({seeds} seed{'s' * (seeds != 1)}, TLS {'on' if self.store.tls else 'off'})"
        return (
            f"POP {self.pop!r} on {', '.join(self.interfaces)} from {self.source_ipv6}: "
            f"{len(self.vips)} VIP{'s' * (len(self.vips) != 1)} "
            f"({', '.join(str(v) for v in self.vips)}), "
            f"{backends} backend{'s' * (backends != 1)}"
            + (f" ({draining} draining)" if draining else "")
            + f", {store}, health checks {self.health.kind}, "
            f"{self.impl} data path with {self.workers} worker{'s' * (self.workers != 1)}"
            + (
                f", BGP via BIRD ({', '.join(self.bgp.protocols)})."
                if self.bgp.kind is BgpKind.BIRD
                else "."
            )
        )


# --- loading ------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str]) -> ForwarderConfig:
    """Read and validate a TOML file; relative paths inside it are taken from its directory."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(str(p), f"cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(p), f"not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(str(p), "not valid TOML: the file is not UTF-8") from None
    return parse_config(data, base_dir=p.parent)


def parse_config(data: Mapping[str, Any], *, base_dir: Path | None = None) -> ForwarderConfig:
    """Validate parsed TOML. Relative file paths are resolved against `base_dir` if given.

    Does not touch the filesystem or the environment: secrets and TLS files are read at start-up.
    Only `user` and `group` are looked up (in the user database), so that a typo is refused here.
    """
    top = _Section(data, "", _TOP_KEYS)
    pop = top.pop_id("pop")
    interfaces = top.interfaces("interfaces")
    source = _ipv6(top.address("source_ipv6", "the source address"))
    kw: dict[str, Any] = {
        "pop": pop,
        "interfaces": interfaces,
        "source_ipv6": source,
        "workers": top.integer("workers", 1, 1024),
        "impl": top.choice("impl", Impl),
        "ingress_drop": top.boolean("ingress_drop"),
        "drop_capabilities": top.boolean("drop_capabilities"),
        "user": _user(top),
        "group": _group(top),
        "timeouts": _parse_timeouts(top.section("timeouts", _TIMEOUT_KEYS)),
        "store": _parse_store(top.section("store", _STORE_KEYS), base_dir),
        "flow_table": _parse_flow_table(top.section("flow_table", _FLOW_TABLE_KEYS)),
        "vips": _parse_vips(top, source),
        "control": _parse_control(top.section("control", _CONTROL_KEYS), base_dir),
    }
    if "health" in top.data:
        kw["health"] = _parse_health(top.section("health", _HEALTH_KEYS))
    kw["bgp"] = _parse_bgp(top.section("bgp", _BGP_KEYS), base_dir)
    return _build(ForwarderConfig, kw)


def _toml_keys(cls: type[Any], **renames: str) -> tuple[str, ...]:
    """The TOML keys of a config table: its dataclass's fields, some spelled as in TOML."""
    return tuple(renames.get(f.name, f.name) for f in fields(cls))


_TOP_KEYS = _toml_keys(ForwarderConfig, vips="vip")
_TIMEOUT_KEYS = _toml_keys(TimeoutsConfig)
_STORE_KEYS = _toml_keys(StoreConfig)
_FLOW_TABLE_KEYS = _toml_keys(FlowTableConfig)
_VIP_KEYS = _toml_keys(VipConfig, backends="backend")
_BACKEND_KEYS = _toml_keys(BackendConfig)
_CONTROL_KEYS = _toml_keys(ControlConfig)
_HEALTH_KEYS = _toml_keys(HealthConfig)
_BGP_KEYS = _toml_keys(BgpConfig)
_T = TypeVar("_T")
_E = TypeVar("_E", bound=enum.StrEnum)


def _build(cls: type[_T], kw: dict[str, Any]) -> _T:
    """Construct `cls` from the keys that were present; absent (None) ones take the default."""
    return cls(**{k: v for k, v in kw.items() if v is not None})


def _user(top: _Section) -> str | None:
    """`user`: an existing account other than root."""
    import pwd

    name = top.string("user")
    if name is None:
        return None
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        reason = f"no user {name!r} on this host (create it, e.g. useradd --system {name})"
        raise ConfigError(top.name("user"), reason) from None
    if entry.pw_uid == 0:
        reason = f"{name!r} is root: leave `user` out to stay root (see drop_capabilities)"
        raise ConfigError(top.name("user"), reason)
    return name


def _group(top: _Section) -> str | None:
    """`group`: an existing group other than root's, and only with `user`."""
    import grp

    name = top.string("group")
    if name is None:
        return None
    if "user" not in top.data:
        raise ConfigError(top.name("group"), "only with `user` (the group the workers run as)")
    try:
        entry = grp.getgrnam(name)
    except KeyError:
        reason = f"no group {name!r} on this host (create it, e.g. groupadd --system {name})"
        raise ConfigError(top.name("group"), reason) from None
    if entry.gr_gid == 0:
        raise ConfigError(top.name("group"), f"{name!r} is root's group (gid 0)")
    return name


def _parse_timeouts(s: _Section) -> TimeoutsConfig:
    kw = {
        "tcp_idle_s": s.seconds("tcp_idle_s"),
        "udp_idle_s": s.seconds("udp_idle_s"),
        "fin_linger_s": s.seconds("fin_linger_s", allow_zero=True),
        "store_ttl_s": s.seconds("store_ttl_s"),
    }
    t = _build(TimeoutsConfig, kw)
    if kw["store_ttl_s"] is None:
        t = replace(t, store_ttl_s=t.tcp_idle_s)
    return t


def _parse_store(s: _Section, base_dir: Path | None) -> StoreConfig:
    seeds = s.endpoints("seeds")
    kind = s.choice("kind", StoreKind)
    if kind is None:
        kind = StoreKind.REDIS_CLUSTER if seeds else StoreKind.MEMORY
    if kind is StoreKind.REDIS_CLUSTER and not seeds:
        raise ConfigError(s.name("seeds"), "kind = 'redis-cluster' needs at least one seed node")
    if kind is StoreKind.MEMORY and seeds:
        raise ConfigError(s.name("seeds"), "seeds are only used with kind = 'redis-cluster'")

    sources = [k for k in ("password", "password_file", "password_env") if k in s.data]
    if len(sources) > 1:
        raise ConfigError(
            s.name(sources[1]), f"give at most one of {', '.join(sources)} (they conflict)"
        )
    password = s.secret("password")
    password_env = s.string("password_env")
    if password_env is not None and not _ENV_RE.fullmatch(password_env):
        raise ConfigError(
            s.name("password_env"), f"{password_env!r} is not an environment variable name"
        )
    username = s.string("username")
    if username == "":
        raise ConfigError(s.name("username"), "empty; remove the key for the default user")

    tls = s.boolean("tls")
    files = {k: s.file_path(k, base_dir) for k in ("tls_ca_file", "tls_cert_file", "tls_key_file")}
    if not tls:
        for k, v in files.items():
            if v is not None:
                raise ConfigError(s.name(k), "set, but tls is off (add tls = true)")
    if (files["tls_cert_file"] is None) != (files["tls_key_file"] is None):
        missing = "tls_key_file" if files["tls_key_file"] is None else "tls_cert_file"
        raise ConfigError(s.name(missing), "client certificate and key must be given together")

    return _build(
        StoreConfig,
        {
            "kind": kind,
            "seeds": seeds,
            "username": username,
            "password": password,
            "password_file": s.file_path("password_file", base_dir),
            "password_env": password_env,
            "tls": tls,
            **files,
            "lookup_deadline_ms": s.number("lookup_deadline_ms", 0.0, 10000.0),
            "lookup_patience_ms": s.number("lookup_patience_ms", 0.0, 10000.0),
            "write_deadline_ms": s.number("write_deadline_ms", 0.0, 60000.0),
            "max_writes_per_s": s.integer("max_writes_per_s", 1, 10_000_000),
            "fallback": s.boolean("fallback"),
            "read_from_replicas": s.choice("read_from_replicas", ReplicaReads),
        },
    )


def _parse_flow_table(s: _Section) -> FlowTableConfig:
    t = _build(
        FlowTableConfig,
        {
            "capacity": s.integer("capacity", 1, 1 << 32),
            "miss_queue_per_flow": s.integer("miss_queue_per_flow", 1, 1 << 16),
            "miss_queue_total": s.integer("miss_queue_total", 1, 1 << 24),
        },
    )
    if t.miss_queue_total < t.miss_queue_per_flow:
        raise ConfigError(
            s.name("miss_queue_total"),
            f"{t.miss_queue_total} is smaller than miss_queue_per_flow ({t.miss_queue_per_flow})",
        )
    return t


def _parse_vips(top: _Section, source: ipaddress.IPv6Address) -> tuple[VipConfig, ...]:
    tables = top.tables("vip")
    if not tables:
        raise ConfigError("vip", "no VIP configured (add a [[vip]] table)")
    if len(tables) > MAX_VIPS:
        raise ConfigError("vip", f"at most {MAX_VIPS} VIPs per forwarder, got {len(tables)}")
    vips: list[VipConfig] = []
    seen: dict[tuple[IPAddress, int, Proto], int] = {}
    for i, raw in enumerate(tables):
        vip = _parse_vip(_Section(raw, f"vip[{i}]", _VIP_KEYS), source)
        key = (vip.address, vip.port, vip.protocol)
        if key in seen:
            raise ConfigError(f"vip[{i}]", f"duplicate of vip[{seen[key]}] ({vip})")
        seen[key] = i
        vips.append(vip)
    return tuple(vips)


def _parse_vip(s: _Section, source: ipaddress.IPv6Address) -> VipConfig:
    address = s.address("address", "a VIP", ipv6_only=False)
    port = s.integer("port", 1, 65535, required=True)
    protocol = s.choice("protocol", _ProtoName, required=True)
    size = s.integer("maglev_size", 3, maglev.MAX_SIZE) or maglev.DEFAULT_SIZE
    if not maglev.is_prime(size):
        raise ConfigError(
            s.name("maglev_size"), f"{size} is not prime (try 65537, 131071 or 1048573)"
        )

    tables = s.tables("backend")
    if not tables:
        raise ConfigError(s.name("backend"), "no backend (add a [[vip.backend]] table)")
    if len(tables) >= size or len(tables) > maglev.NO_BACKEND:
        raise ConfigError(
            s.name("maglev_size"),
            f"{len(tables)} backends need a larger table than {size} (ideally 100x as many slots)",
        )
    backends: list[BackendConfig] = []
    seen: dict[ipaddress.IPv6Address, int] = {}
    for j, raw in enumerate(tables):
        b = _Section(raw, f"{s.path}.backend[{j}]", _BACKEND_KEYS)
        addr = _ipv6(b.address("address", "a backend address"))
        if addr in seen:
            raise ConfigError(b.name("address"), f"{addr} is already backend[{seen[addr]}]")
        if addr == source:
            raise ConfigError(
                b.name("address"), f"{addr} is this forwarder's source_ipv6; packets would loop"
            )
        seen[addr] = j
        backend = _build(
            BackendConfig,
            {
                "address": addr,
                "weight": b.integer("weight", 0, 65535),
                "state": b.choice("state", BackendState),
                "check_address": (
                    b.address("check_address", "a check address", ipv6_only=False)
                    if "check_address" in b.data
                    else None
                ),
            },
        )
        backends.append(backend)
    assert protocol is not None and port is not None
    lookup_first = s.boolean("udp_lookup_first")
    if lookup_first is not None and protocol is not _ProtoName.UDP:
        raise ConfigError(s.name("udp_lookup_first"), "only for protocol = 'udp'")
    return VipConfig(
        address=address,
        port=port,
        protocol=Proto[protocol.name],
        maglev_size=size,
        backends=tuple(backends),
        udp_lookup_first=protocol is _ProtoName.UDP and lookup_first is not False,
    )


class _ProtoName(enum.StrEnum):
    TCP = "tcp"
    UDP = "udp"


def _parse_control(s: _Section, base_dir: Path | None) -> ControlConfig:
    socket = s.file_path("socket", base_dir)
    if socket is not None and len(os.fsencode(socket)) > MAX_SOCKET_PATH:
        raise ConfigError(
            s.name("socket"), f"Unix socket paths are limited to {MAX_SOCKET_PATH} bytes"
        )
    c = _build(ControlConfig, {"socket": socket})
    if "metrics" in s.data:
        text = s.string("metrics")
        metrics = _parse_endpoint(s.name("metrics"), text) if text else None
        c = replace(c, metrics=metrics)
    if "state_file" in s.data:
        text = s.string("state_file")
        c = replace(c, state_file=s.file_path("state_file", base_dir) if text else None)
    return c


def _parse_health(s: _Section) -> HealthConfig:
    h = _build(
        HealthConfig,
        {
            "kind": s.choice("kind", HealthKind),
            "interval_ms": s.integer("interval_ms", 10, 3_600_000),
            "timeout_ms": s.integer("timeout_ms", 1, 3_600_000),
            "rise": s.integer("rise", 1, 1000),
            "fall": s.integer("fall", 1, 1000),
            "port": s.integer("port", 1, 65535),
            "path": s.string("path"),
            "repin_after_ms": s.integer("repin_after_ms", 0, 86_400_000),
        },
    )
    if h.timeout_ms > h.interval_ms:
        raise ConfigError(
            s.name("timeout_ms"),
            f"{h.timeout_ms} ms is longer than interval_ms ({h.interval_ms} ms)",
        )
    if "path" in s.data:
        if h.kind is not HealthKind.HTTP:
            raise ConfigError(s.name("path"), f"only used by kind = 'http', not '{h.kind}'")
        if not h.path.startswith("/") or any(c.isspace() for c in h.path):
            raise ConfigError(s.name("path"), f"{h.path!r} must start with '/' and have no spaces")
    if h.kind is HealthKind.NONE and "port" in s.data:
        raise ConfigError(s.name("port"), "set, but kind = 'none' runs no checks")
    return h


_BIRD_SYMBOL_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _parse_bgp(s: _Section, base_dir: Path | None) -> BgpConfig:
    kind = s.choice("kind", BgpKind)
    if kind in (None, BgpKind.NONE):
        extra = [k for k in s.data if k != "kind"]
        if extra:
            raise ConfigError(
                s.name(extra[0]), "set, but kind = 'none' announces nothing (add kind = 'bird')"
            )
        return BgpConfig()
    birdc = s.string("birdc")
    if birdc is not None:
        if not birdc or "\0" in birdc:
            raise ConfigError(s.name("birdc"), f"{birdc!r} is not a program")
        if "/" in birdc:
            birdc = str(s.file_path("birdc", base_dir))
    socket = s.file_path("socket", base_dir)
    if socket is not None and len(os.fsencode(socket)) > MAX_SOCKET_PATH:
        raise ConfigError(
            s.name("socket"), f"Unix socket paths are limited to {MAX_SOCKET_PATH} bytes"
        )
    protocols = s.data.get("protocols")
    if protocols is not None:
        if not isinstance(protocols, list) or not protocols:
            raise ConfigError(s.name("protocols"), "must be a non-empty array of protocol names")
        for i, name in enumerate(protocols):
            if not isinstance(name, str) or not _BIRD_SYMBOL_RE.fullmatch(name):
                raise ConfigError(
                    f"{s.name('protocols')}[{i}]",
                    f"{name!r} is not a BIRD protocol name (a letter or _, then A-Z a-z 0-9 _)",
                )
            if name in protocols[:i]:
                raise ConfigError(f"{s.name('protocols')}[{i}]", f"{name!r} is listed twice")
        protocols = tuple(protocols)
    b = _build(
        BgpConfig,
        {
            "kind": kind,
            "birdc": birdc,
            "socket": socket,
            "protocols": protocols,
            "check_interval_ms": s.integer("check_interval_ms", 10, 60_000),
            "announce_delay_ms": s.integer("announce_delay_ms", 0, 3_600_000),
            "stall_timeout_ms": s.integer("stall_timeout_ms", 10, 3_600_000),
            "withdraw_on_store_loss": s.boolean("withdraw_on_store_loss"),
        },
    )
    if b.stall_timeout_ms < b.check_interval_ms:
        raise ConfigError(
            s.name("stall_timeout_ms"),
            f"{b.stall_timeout_ms} ms is shorter than check_interval_ms ({b.check_interval_ms} ms)",
        )
    if "drain_file" in s.data:
        text = s.string("drain_file")
        b = replace(b, drain_file=s.file_path("drain_file", base_dir) if text else None)
    return b


# --- typed access to one TOML table, with dotted-path errors ------------------------------------


_TYPE_NAMES = {
    bool: "a boolean",
    int: "an integer",
    float: "a float",
    str: "a string",
    list: "an array",
    dict: "a table",
}


def _type_name(value: object) -> str:
    return _TYPE_NAMES.get(type(value), f"a {type(value).__name__}")


class _Section:
    """One TOML table at a dotted path; getters return None for absent optional keys."""

    def __init__(self, raw: object, path: str, keys: Iterable[str]) -> None:
        if not isinstance(raw, dict):
            raise ConfigError(path or "(top level)", f"must be a table, got {_type_name(raw)}")
        self.data: dict[str, Any] = raw
        self.path = path
        allowed = list(keys)
        unknown = sorted(k for k in raw if k not in allowed)
        if unknown:
            close = difflib.get_close_matches(unknown[0], allowed, n=1)
            reason = "unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")
            if len(unknown) > 1:
                reason += f"; also unknown: {', '.join(unknown[1:])}"
            raise ConfigError(self.name(unknown[0]), reason)

    def name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def _get(self, key: str, required: bool) -> Any:
        if key not in self.data:
            if required:
                raise ConfigError(self.name(key), "missing (required)")
            return None
        return self.data[key]

    def section(self, key: str, keys: Iterable[str]) -> _Section:
        raw = self.data.get(key, {})
        if isinstance(raw, list):
            raise ConfigError(self.name(key), f"write [{key}] once, not [[{key}]]")
        return _Section(raw, self.name(key), keys)

    def tables(self, key: str) -> list[Any]:
        raw = self._get(key, False)
        if raw is None:
            return []
        if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
            header = re.sub(r"\[\d+\]", "", self.name(key))
            raise ConfigError(self.name(key), f"must be an array of tables: write [[{header}]]")
        return raw

    def string(self, key: str, *, required: bool = False) -> str | None:
        v = self._get(key, required)
        if v is not None and not isinstance(v, str):
            raise ConfigError(self.name(key), f"must be a string, got {_type_name(v)}")
        return v

    def secret(self, key: str) -> Secret | None:
        v = self._get(key, False)
        if v is None:
            return None
        # Never echo the value: it may be a real password with a typo.
        if not isinstance(v, str):
            raise ConfigError(self.name(key), f"must be a string, got {_type_name(v)}")
        if not v:
            raise ConfigError(self.name(key), "empty; remove the key for no password")
        return Secret(v)

    def boolean(self, key: str) -> bool | None:
        v = self._get(key, False)
        if v is not None and not isinstance(v, bool):
            raise ConfigError(self.name(key), f"must be true or false, got {_type_name(v)}")
        return v

    def integer(self, key: str, lo: int, hi: int, *, required: bool = False) -> int | None:
        v = self._get(key, required)
        if v is None:
            return None
        if not isinstance(v, int) or isinstance(v, bool):
            raise ConfigError(self.name(key), f"must be an integer, got {_type_name(v)} {v!r}")
        if not lo <= v <= hi:
            raise ConfigError(self.name(key), f"{v} is out of range {lo}..{hi}")
        return v

    def number(self, key: str, lo: float, hi: float, *, allow_zero: bool = False) -> float | None:
        """A number in (lo, hi], or [lo, hi] with `allow_zero`."""
        v = self._get(key, False)
        if v is None:
            return None
        if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
            raise ConfigError(self.name(key), f"must be a number, got {_type_name(v)} {v!r}")
        if v < lo or (v == lo and not allow_zero):
            raise ConfigError(
                self.name(key), f"must be {'at least' if allow_zero else 'more than'} {lo:g}"
            )
        if v > hi:
            raise ConfigError(self.name(key), f"{v:g} is more than the maximum {hi:g}")
        return float(v)

    def seconds(self, key: str, *, allow_zero: bool = False) -> float | None:
        v = self.number(key, 0.0, math.inf, allow_zero=allow_zero)
        if v is not None and v > MAX_TIMEOUT_S:
            raise ConfigError(
                self.name(key),
                f"{v:g} s is more than a day; the unit is seconds, not milliseconds",
            )
        return v

    def choice(self, key: str, kind: type[_E], *, required: bool = False) -> _E | None:
        v = self.string(key, required=required)
        if v is None:
            return None
        try:
            return kind(v)
        except ValueError:
            names = [repr(m.value) for m in kind]
            options = f"{', '.join(names[:-1])} or {names[-1]}"
            raise ConfigError(self.name(key), f"{v!r} is not one of {options}") from None

    def file_path(self, key: str, base_dir: Path | None) -> Path | None:
        v = self.string(key)
        if v is None:
            return None
        if not v or "\0" in v:
            raise ConfigError(self.name(key), f"{v!r} is not a file path")
        p = Path(v)
        return base_dir / p if base_dir is not None and not p.is_absolute() else p

    def pop_id(self, key: str) -> str:
        v = self.string(key, required=True)
        assert v is not None
        if not _POP_RE.fullmatch(v) or len(v) > MAX_POP_LEN:
            raise ConfigError(
                self.name(key),
                f"{v!r} is not a POP id (1..{MAX_POP_LEN} characters of A-Z a-z 0-9 _ . -)",
            )
        return v

    def interfaces(self, key: str) -> tuple[str, ...]:
        v = self._get(key, True)
        if not isinstance(v, list):
            raise ConfigError(self.name(key), f"must be an array of names, got {_type_name(v)}")
        if not v:
            raise ConfigError(self.name(key), "empty; name at least one interface to receive on")
        seen: set[str] = set()
        for i, name in enumerate(v):
            where = f"{self.name(key)}[{i}]"
            if not isinstance(name, str):
                raise ConfigError(where, f"must be a string, got {_type_name(name)}")
            if (
                not 1 <= len(name.encode()) <= 15
                or name in (".", "..")
                or any(c.isspace() or c in "/:" for c in name)
            ):
                raise ConfigError(
                    where,
                    f"{name!r} is not a Linux interface name (1..15 bytes, no spaces, '/' or ':')",
                )
            if name in seen:
                raise ConfigError(where, f"{name!r} is listed twice")
            seen.add(name)
        return tuple(v)

    def address(self, key: str, what: str, *, ipv6_only: bool = True) -> IPAddress:
        v = self.string(key, required=True)
        assert v is not None
        try:
            addr = ipaddress.ip_address(v)
        except ValueError:
            family = "IPv6" if ipv6_only else "IPv4 or IPv6"
            raise ConfigError(self.name(key), f"{v!r} is not an {family} address") from None
        if ipv6_only and addr.version == 4:
            raise ConfigError(
                self.name(key),
                f"{v!r} is an IPv4 address; tunnels run over IPv6: give an IPv6 address",
            )
        _check_unicast(self.name(key), addr, what)
        return addr

    def endpoints(self, key: str) -> tuple[Endpoint, ...]:
        v = self._get(key, False)
        if v is None:
            return ()
        if not isinstance(v, list):
            raise ConfigError(
                self.name(key), f'must be an array of "host:port", got {_type_name(v)}'
            )
        out: list[Endpoint] = []
        for i, item in enumerate(v):
            where = f"{self.name(key)}[{i}]"
            if not isinstance(item, str):
                raise ConfigError(where, f'must be a "host:port" string, got {_type_name(item)}')
            ep = _parse_endpoint(where, item)
            if ep in out:
                raise ConfigError(where, f"{item!r} is listed twice")
            out.append(ep)
        return tuple(out)


def _ipv6(addr: IPAddress) -> ipaddress.IPv6Address:
    assert isinstance(addr, ipaddress.IPv6Address)
    return addr


def _check_unicast(name: str, addr: IPAddress, what: str) -> None:
    problem = None
    if addr.is_unspecified:
        problem = "the unspecified address"
    elif addr.is_multicast:
        problem = "a multicast address"
    elif addr.is_loopback:
        problem = "a loopback address"
    elif addr.is_link_local:
        problem = "link-local (it needs an interface scope)"
    elif addr == ipaddress.IPv4Address("255.255.255.255"):
        problem = "the broadcast address"
    elif isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        problem = "IPv4-mapped" + (f" (write {addr.ipv4_mapped})" if what == "a VIP" else "")
    if problem:
        raise ConfigError(name, f"{addr} is {problem}; {what} must be unicast")


def _parse_endpoint(name: str, text: str) -> Endpoint:
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(name, f'{text!r} is not "host:port"')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(name, f"{host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ConfigError(name, f'write IPv6 addresses in brackets: "[{host}]:{port_text}"')
    elif not _HOSTNAME_RE.fullmatch(host) or (
        host.replace(".", "").isdigit() and not _is_ipv4(host)
    ):
        raise ConfigError(name, f"{host!r} is not a hostname or IPv4 address")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(name, f"{port_text!r} is not a port (1..65535)")
    return Endpoint(host, int(port_text))


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True
