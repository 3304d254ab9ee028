"""Start, inspect and stop a local Redis Cluster for flowstate's tests and labs.

Used by `deploy/redis-cluster` and imported by the test fixtures. Standard library only, so
it works before `pip install` and on a bare CI machine. Nodes are daemonized `redis-server`
processes whose configs, pid files and logs live under one directory; the layout is recorded
in `<dir>/cluster.json` so `down`, `status` and `start-node` need only the directory.

Nodes may run inside network namespaces (`ip netns exec NS redis-server ...`); we talk to
them over sockets created inside that namespace (setns on the calling thread), so `status`
works from the root namespace without routing into the lab.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeAlias, Union

#: Hint printed when a Redis binary is missing.
INSTALL_HINT = "install it with `apt-get install -y redis-server redis-tools`"
#: Name of the layout file inside the cluster directory.
STATE_FILE = "cluster.json"
CLUSTER_SLOTS = 16384
#: Redis Cluster's bus port is always the client port plus this offset.
BUS_PORT_OFFSET = 10000
#: What flowstate's ACL user may do (`--user`): its data commands on its keys, and what
#: redis-py's cluster client needs to discover the cluster (CLUSTER SLOTS, COMMAND; ASKING
#: and READONLY for redirections and replica reads). redis-py also sends CLIENT SETINFO, which
#: Redis 7.0 does not know (7.2 does: allow +client|setinfo there; redis-py ignores a refusal).
FLOWSTATE_ACL = (
    "resetkeys ~fs1:* resetchannels -@all "
    "+get +set +pexpire +exists +del +pttl +scan +ping +echo "
    "+cluster|slots +cluster|shards +cluster|nodes +cluster|info +command "
    "+asking +readonly +readwrite +client|setname"
)
_CLONE_NEWNET = 0x40000000
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

Reply: TypeAlias = Union[int, bytes, list["Reply"], None]  # noqa: UP007 (recursive alias)


class ClusterError(Exception):
    """A failure reported to the user as one line; `code` is the process exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class ReplyError(Exception):
    """A node answered with an error reply (`-ERR ...`)."""


# --- sockets and a minimal RESP2 client ----------------------------------------------------


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def open_socket(host: str, netns: str | None) -> socket.socket:
    """A TCP socket for `host`, created inside network namespace `netns` when given.

    A socket belongs to the namespace it was created in, so we switch this thread into
    `netns` only for the `socket()` call and switch straight back.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if not netns:
        return socket.socket(family, socket.SOCK_STREAM)
    try:
        target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    except OSError as exc:
        raise ClusterError(f"network namespace {netns!r} not found: {exc.strerror}") from None
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _setns(target)
        try:
            return socket.socket(family, socket.SOCK_STREAM)
        finally:
            _setns(own)
    finally:
        os.close(own)
        os.close(target)


@dataclass(frozen=True)
class TlsFiles:
    """TLS for the nodes (client port, cluster bus and replication): PEM files.

    `cert`/`key` is each node's certificate (it must name the nodes' addresses, e.g. as IP
    SANs, for clients that check host names); it also serves as the client certificate of
    the cluster bus, replication, `redis-cli` and our own probes. `ca` verifies peers.
    """

    cert: Path
    key: Path
    ca: Path

    def client_context(self) -> ssl.SSLContext:
        """A context that verifies a node against `ca` and presents `cert` (mutual TLS)."""
        ctx = ssl.create_default_context(cafile=str(self.ca))
        ctx.load_cert_chain(str(self.cert), str(self.key))
        return ctx

    def cli_args(self) -> list[str]:
        """The same for `redis-cli`."""
        return ["--tls", "--cacert", str(self.ca), "--cert", str(self.cert), "--key", str(self.key)]


def make_certs(dir: Path, addresses: Sequence[str], openssl: str = "openssl") -> TlsFiles:
    """A throw-away CA and one certificate for every node (and client) named by `addresses`
    (IP SANs), made with openssl in `dir`: for tests and labs, never for production."""
    dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca, ca_key = dir / "ca.crt", dir / "ca.key"
    cert, key, csr = dir / "redis.crt", dir / "redis.key", dir / "redis.csr"
    ext = dir / "redis.ext"
    sans = ",".join(
        f"IP:{a}" if re.fullmatch(r"[0-9.:a-fA-F]+", a) else f"DNS:{a}" for a in addresses
    )
    ext.write_text(
        f"subjectAltName={sans}\nextendedKeyUsage=serverAuth,clientAuth\n"
        "basicConstraints=critical,CA:FALSE\n"
    )
    curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca_subject = ["-subj", "/CN=flowstate throw-away CA", "-days", "7"]
    sign = ["-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-days", "7"]
    steps = [
        [openssl, "req", "-x509", *curve, "-keyout", str(ca_key), "-out", str(ca), *ca_subject],
        [openssl, "req", *curve, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=redis"],
        [openssl, "x509", "-req", "-in", str(csr), *sign, "-out", str(cert), "-extfile", str(ext)],
    ]
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise ClusterError(f"{' '.join(cmd[:3])}: {done.stderr.strip()[-300:]}")
    for path in (ca_key, key):
        path.chmod(0o600)
    return TlsFiles(cert, key, ca)


class Client:
    """A blocking RESP2 connection to one node; enough for PING, INFO and CLUSTER commands."""

    def __init__(
        self,
        host: str,
        port: int,
        password: str | None = None,
        netns: str | None = None,
        timeout: float = 2.0,
        tls: TlsFiles | None = None,
    ) -> None:
        sock = open_socket(host, netns)
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
            if tls is not None:
                sock = tls.client_context().wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._file = sock.makefile("rb")
        if password:
            self.call("AUTH", password)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def call(self, *args: str | int | bytes) -> Reply:
        """Send one command and return its reply; raise ReplyError on an error reply."""
        parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
        out = [b"*%d\r\n" % len(parts)]
        for p in parts:
            out.append(b"$%d\r\n%s\r\n" % (len(p), p))
        self._sock.sendall(b"".join(out))
        return self._read()

    def text(self, *args: str | int | bytes) -> str:
        """`call` for commands answering a bulk or simple string (INFO, CLUSTER NODES)."""
        reply = self.call(*args)
        if not isinstance(reply, bytes):
            raise ReplyError(f"{args[0]!r}: expected a string reply, got {type(reply).__name__}")
        return reply.decode(errors="replace")

    def _read(self) -> Reply:
        line = self._file.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("connection closed by the node")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return bytes(rest)
        if kind == b"-":
            raise ReplyError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self._file.read(n + 2)
            if len(data) != n + 2:
                raise ConnectionError("connection closed by the node")
            return bytes(data[:-2])
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._read() for _ in range(n)]
        raise ConnectionError(f"unexpected RESP reply type {kind!r}")


def parse_info(text: str) -> dict[str, str]:
    """`INFO` / `CLUSTER INFO` text as a dict (sections and comments dropped)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and ":" in line:
            k, _, v = line.partition(":")
            out[k.strip()] = v.strip()
    return out


# --- layout ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeSpec:
    """One node: index i listens on base_port + i on `host`, inside `netns` if set."""

    index: int
    host: str
    port: int
    netns: str | None = None

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ClusterSpec:
    """Everything needed to (re)start, inspect or stop one cluster; saved as cluster.json."""

    dir: Path
    base_port: int
    nodes: tuple[NodeSpec, ...]
    replicas: int = 1
    node_timeout_ms: int = 2000
    password: str | None = None
    tls: TlsFiles | None = None
    """TLS only (no plain-text port): clients, cluster bus and replication."""
    user: str | None = None
    """An ACL user for flowstate (FLOWSTATE_ACL); the default user stays the admin."""
    user_password: str | None = None

    @classmethod
    def build(
        cls,
        *,
        dir: Path,
        base_port: int,
        count: int,
        hosts: Sequence[str],
        netns: Sequence[str] = (),
        replicas: int = 1,
        node_timeout_ms: int = 2000,
        password: str | None = None,
        tls: TlsFiles | None = None,
        user: str | None = None,
        user_password: str | None = None,
    ) -> ClusterSpec:
        """Validate options and lay nodes out round-robin over `hosts` and `netns`."""
        if replicas < 0:
            raise ClusterError("--replicas must be >= 0", 2)
        if count < 3 * (replicas + 1):
            raise ClusterError(
                f"--nodes {count} is too few: Redis Cluster needs 3 masters, so at least "
                f"{3 * (replicas + 1)} nodes with --replicas {replicas}",
                2,
            )
        if base_port < 1 or base_port + count - 1 + BUS_PORT_OFFSET > 65535:
            raise ClusterError(
                f"--base-port {base_port}: ports up to base+{count - 1}+{BUS_PORT_OFFSET} "
                "(the cluster bus) must fit in 65535",
                2,
            )
        if node_timeout_ms < 100:
            raise ClusterError("--node-timeout must be at least 100 ms", 2)
        if not hosts:
            raise ClusterError("--host must name at least one address", 2)
        for what, secret in (("the password", password), ("the user's password", user_password)):
            if secret is not None and (not secret or any(c.isspace() for c in secret)):
                raise ClusterError(f"{what} must be non-empty and contain no whitespace", 2)
        if (user is None) != (user_password is None):
            raise ClusterError("--user and its password (--user-password) go together", 2)
        if user is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", user):
            raise ClusterError(f"--user {user!r}: use 1-64 of A-Z a-z 0-9 _ . -", 2)
        if user == "default":
            raise ClusterError("--user names the ACL user for flowstate, not 'default'", 2)
        if tls is not None:
            for path in (tls.cert, tls.key, tls.ca):
                if not path.is_file():
                    raise ClusterError(f"TLS file {path} not found", 2)
        nodes = tuple(
            NodeSpec(
                i,
                hosts[i % len(hosts)],
                base_port + i,
                netns[i % len(netns)] if netns else None,
            )
            for i in range(count)
        )
        return cls(
            dir, base_port, nodes, replicas, node_timeout_ms, password, tls, user, user_password
        )

    @property
    def masters(self) -> int:
        return len(self.nodes) // (self.replicas + 1)

    @property
    def seeds(self) -> list[str]:
        return [n.addr for n in self.nodes]

    def node_dir(self, node: NodeSpec) -> Path:
        return self.dir / f"node-{node.port}"

    def describe(self) -> str:
        where = ",".join(sorted({n.host for n in self.nodes}))
        ns = ",".join(sorted({n.netns for n in self.nodes if n.netns}))
        return (
            f"{len(self.nodes)} nodes on {where}:{self.base_port}+"
            + (f" in netns {ns}" if ns else "")
            + f", {self.replicas} replica(s) per master"
        )

    def differences(self, other: ClusterSpec) -> list[str]:
        """Names of the settings that differ from `other` (empty: same cluster)."""
        diff = []
        if self.nodes != other.nodes:
            diff.append("nodes/hosts/netns")
        if self.replicas != other.replicas:
            diff.append("replicas")
        if self.node_timeout_ms != other.node_timeout_ms:
            diff.append("node-timeout")
        if self.password != other.password:
            diff.append("password")
        if self.tls != other.tls:
            diff.append("tls")
        if (self.user, self.user_password) != (other.user, other.user_password):
            diff.append("user")
        return diff

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": 1,
                "base_port": self.base_port,
                "replicas": self.replicas,
                "node_timeout_ms": self.node_timeout_ms,
                "password": self.password,
                "tls": None
                if self.tls is None
                else {"cert": str(self.tls.cert), "key": str(self.tls.key), "ca": str(self.tls.ca)},
                "user": self.user,
                "user_password": self.user_password,
                "nodes": [
                    {"index": n.index, "host": n.host, "port": n.port, "netns": n.netns}
                    for n in self.nodes
                ],
            },
            indent=2,
        )

    @classmethod
    def load(cls, dir: Path) -> ClusterSpec | None:
        """The layout saved in `dir`, or None if there is none."""
        try:
            raw = json.loads((dir / STATE_FILE).read_text())
            nodes = tuple(
                NodeSpec(int(n["index"]), str(n["host"]), int(n["port"]), n.get("netns"))
                for n in raw["nodes"]
            )
            tls = raw.get("tls")
            return cls(
                dir,
                int(raw["base_port"]),
                nodes,
                int(raw["replicas"]),
                int(raw["node_timeout_ms"]),
                raw.get("password"),
                None
                if tls is None
                else TlsFiles(Path(tls["cert"]), Path(tls["key"]), Path(tls["ca"])),
                raw.get("user"),
                raw.get("user_password"),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ClusterError(
                f"{dir / STATE_FILE} is unreadable ({exc}); run `down --dir {dir}` to clean up"
            ) from None

    def save(self) -> None:
        path = self.dir / STATE_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.to_json() + "\n")

    def render_config(self, node: NodeSpec) -> str:
        """redis.conf for one node: no persistence, quick failover, fast first replica sync."""
        d = self.node_dir(node)
        if self.tls is None:
            ports = [f"port {node.port}"]
        else:
            # TLS only: the client port speaks TLS, so do the cluster bus and replication.
            # Clients may present a certificate (mutual TLS) but need not.
            ports = [
                "port 0",
                f"tls-port {node.port}",
                f'tls-cert-file "{self.tls.cert}"',
                f'tls-key-file "{self.tls.key}"',
                f'tls-ca-cert-file "{self.tls.ca}"',
                "tls-cluster yes",
                "tls-replication yes",
                "tls-auth-clients optional",
            ]
        lines = [
            *ports,
            f"bind {node.host}",
            "protected-mode no",
            "daemonize yes",
            f'pidfile "{d}/redis.pid"',
            f'logfile "{d}/redis.log"',
            f'dir "{d}"',
            "cluster-enabled yes",
            "cluster-config-file nodes.conf",
            f"cluster-node-timeout {self.node_timeout_ms}",
            "appendonly no",
            'save ""',
            # The default 5 s delay (waiting for more replicas to share one diskless
            # transfer) would dominate `up` time; each master has one or two replicas.
            "repl-diskless-sync-delay 0",
        ]
        if self.password:
            lines += [f"requirepass {self.password}", f"masterauth {self.password}"]
        if self.user and self.user_password:
            lines.append(f"user {self.user} on >{self.user_password} {FLOWSTATE_ACL}")
        return "\n".join(lines) + "\n"

    def connect(self, node: NodeSpec, timeout: float = 2.0) -> Client:
        return Client(node.host, node.port, self.password, node.netns, timeout, self.tls)


# --- processes -------------------------------------------------------------------------------


def read_pid(node_dir: Path) -> int | None:
    try:
        return int((node_dir / "redis.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def _proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[0]


def is_our_redis(pid: int, port: int, node_dir: Path) -> bool:
    """True if `pid` is a live (non-zombie) redis-server for `port` or started from `node_dir`.

    Checked before every signal so a recycled PID in a stale pid file is never killed.
    A daemonized redis-server retitles itself "redis-server HOST:PORT [cluster]"; just
    after the fork it still shows its config path.
    """
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    if b"redis-server" not in cmd or _proc_state(pid) in (None, "Z", "X"):
        return False
    return bool(re.search(rb":%d(\s|$)" % port, cmd)) or str(node_dir).encode() in cmd


def node_pid(spec: ClusterSpec, node: NodeSpec) -> int | None:
    """PID of the node's live redis-server, or None if it is not running."""
    d = spec.node_dir(node)
    pid = read_pid(d)
    return pid if pid is not None and is_our_redis(pid, node.port, d) else None


def is_stopped(pid: int) -> bool:
    """True if the process is stopped by SIGSTOP (`kill-node --signal STOP`)."""
    return _proc_state(pid) in ("T", "t")


def last_log_line(spec: ClusterSpec, node: NodeSpec) -> str:
    try:
        lines = (spec.node_dir(node) / "redis.log").read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    for line in reversed(lines):
        if line.strip() and not set(line.strip()) <= set("*#-"):
            return line.strip()
    return "empty log"


def start_node(spec: ClusterSpec, node: NodeSpec, server: str) -> None:
    """Launch one daemonized redis-server from its config (no waiting for PING)."""
    d = spec.node_dir(node)
    (d / "redis.pid").unlink(missing_ok=True)
    cmd = [server, str(d / "redis.conf")]
    if node.netns:
        cmd = ["ip", "netns", "exec", node.netns, *cmd]
    # stderr to a file, not a pipe: a daemon holding the pipe open would hang us.
    with tempfile.TemporaryFile() as err:
        try:
            rc = subprocess.run(
                cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err, timeout=30
            ).returncode
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ClusterError(f"node {node.addr}: cannot run {cmd[0]}: {exc}") from None
        err.seek(0)
        msg = " ".join(err.read().decode(errors="replace").split())[-300:]
    if rc != 0:
        raise ClusterError(f"node {node.addr}: redis-server exited {rc}: {msg or 'no output'}")


def wait_pidfiles(spec: ClusterSpec, timeout: float) -> None:
    """Wait (at most `timeout` s) until every node dir has a pid file: a daemonizing node
    writes it a moment after `start_node` returns, and cleanup must not miss it."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if all(read_pid(spec.node_dir(n)) is not None for n in spec.nodes):
            return
        time.sleep(0.05)


def wait_ping(spec: ClusterSpec, node: NodeSpec, deadline: float) -> int:
    """Wait until the node answers PING; return its PID. Fail fast if the process died."""
    last = "no answer"
    started = time.monotonic()
    while True:
        try:
            with spec.connect(node, timeout=1.0) as c:
                c.call("PING")
            pid = node_pid(spec, node)
            if pid is not None:
                return pid
            last = "answers PING but its pid file names no redis-server of ours"
        except (OSError, ReplyError) as exc:
            last = str(exc) or type(exc).__name__
        d = spec.node_dir(node)
        pid = read_pid(d)
        if pid is not None and not is_our_redis(pid, node.port, d):
            raise ClusterError(f"node {node.addr} exited: {last_log_line(spec, node)}")
        if pid is None and time.monotonic() - started > 5:
            raise ClusterError(f"node {node.addr} did not start: {last_log_line(spec, node)}")
        if time.monotonic() > deadline:
            raise ClusterError(f"node {node.addr} did not answer PING in time: {last}")
        time.sleep(0.05)


def signal_node(pid: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, sig)


def stop_pids(pids: dict[int, tuple[int, Path]], grace: float = 5.0) -> list[int]:
    """SIGTERM each verified redis-server, SIGKILL those alive after `grace` s; return PIDs.

    `pids` maps PID -> (port, node dir) so each is re-verified before every signal.
    """

    def alive() -> list[int]:
        return [p for p, (port, d) in pids.items() if is_our_redis(p, port, d)]

    for pid in alive():
        signal_node(pid, signal.SIGTERM)
        signal_node(pid, signal.SIGCONT)  # a SIGSTOPped node only acts on TERM once resumed
    end = time.monotonic() + grace
    while alive() and time.monotonic() < end:
        time.sleep(0.05)
    for pid in alive():
        signal_node(pid, signal.SIGKILL)
    end = time.monotonic() + 5
    while alive() and time.monotonic() < end:
        time.sleep(0.05)
    left = alive()
    if left:
        raise ClusterError(f"redis-server PIDs {left} survived SIGKILL")
    return list(pids)


def running_in_dir(dir: Path) -> dict[int, tuple[int, Path]]:
    """Verified redis-server PIDs whose pid files are in `dir`/node-PORT (layout-free)."""
    found: dict[int, tuple[int, Path]] = {}
    for d in sorted(dir.glob("node-*")):
        try:
            port = int(d.name.removeprefix("node-"))
        except ValueError:
            continue
        pid = read_pid(d)
        if pid is not None and is_our_redis(pid, port, d):
            found[pid] = (port, d)
    return found


def remove_files(dir: Path) -> bool:
    """Delete what `up` created in `dir`, then `dir` itself if empty; True if it is gone.

    Deletes only node-PORT directories and cluster.json, never anything else the user
    may have put there.
    """
    for d in dir.glob("node-*"):
        if d.is_dir() and d.name.removeprefix("node-").isdigit():
            shutil.rmtree(d, ignore_errors=True)
    (dir / STATE_FILE).unlink(missing_ok=True)
    try:
        dir.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


@contextmanager
def dir_lock(dir: Path) -> Iterator[None]:
    """Serialize up/down/start-node on one cluster directory across processes.

    The lock file sits next to the directory (which `down` deletes); after taking the lock
    we re-check it is still the file at that path, since `down` unlinks it too.
    """
    path = dir.parent / f".{dir.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        if not dir.exists():
            path.unlink(missing_ok=True)
        os.close(fd)


def check_bindable(node: NodeSpec) -> None:
    """Raise ClusterError unless the node's client and bus ports can be bound on its host.

    Binding (with SO_REUSEADDR, like redis-server) tests exactly what the node will do, and
    tells "port taken" apart from "address not configured in this netns".
    """
    for port in (node.port, node.port + BUS_PORT_OFFSET):
        with open_socket(node.host, node.netns) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((node.host, port))
            except OSError as exc:
                where = f" in netns {node.netns}" if node.netns else ""
                if exc.errno == errno.EADDRINUSE:
                    raise ClusterError(
                        f"{node.host}:{port}{where} is already in use: pick another --base-port"
                    ) from None
                raise ClusterError(
                    f"cannot bind {node.host}:{port}{where}: {exc.strerror}"
                ) from None


# --- cluster creation and health -------------------------------------------------------------


def create_cluster(spec: ClusterSpec, cli: str, deadline: float) -> None:
    """`redis-cli --cluster create` over all nodes (run in node 0's netns if any).

    The password goes through REDISCLI_AUTH, not `-a`, so it is not visible in `ps`.
    redis-cli waits forever ("Waiting for the cluster to join...") when nodes cannot
    reach each other's bus port, hence the timeout.
    """
    cmd = [cli, "--no-auth-warning", *(spec.tls.cli_args() if spec.tls else [])]
    cmd += ["--cluster", "create", *spec.seeds]
    cmd += ["--cluster-replicas", str(spec.replicas), "--cluster-yes"]
    if spec.nodes[0].netns:
        cmd = ["ip", "netns", "exec", spec.nodes[0].netns, *cmd]
    env = dict(os.environ)
    env.pop("REDISCLI_AUTH", None)
    if spec.password:
        env["REDISCLI_AUTH"] = spec.password
    try:
        r = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=env,
            timeout=max(1.0, deadline - time.monotonic()),
        )
    except subprocess.TimeoutExpired:
        raise ClusterError(
            "redis-cli --cluster create did not finish in time (it waits forever when the "
            f"nodes cannot reach each other's client and bus ports, port+{BUS_PORT_OFFSET})"
        ) from None
    out = _ANSI.sub("", r.stdout + r.stderr)
    errors = [ln.strip() for ln in out.splitlines() if "[ERR]" in ln or "ERR " in ln]
    if r.returncode != 0 or errors:
        tail = errors[0] if errors else (out.strip().splitlines() or ["no output"])[-1]
        raise ClusterError(f"redis-cli --cluster create failed (exit {r.returncode}): {tail}")


@dataclass
class NodeStatus:
    """What one node says about itself and the cluster (one probe)."""

    index: int
    addr: str
    host: str
    port: int
    netns: str | None
    pid: int | None = None
    alive: bool = False
    stopped: bool = False
    answering: bool = False
    error: str | None = None
    id: str | None = None
    role: str | None = None
    master_id: str | None = None
    cluster_state: str | None = None
    master_link_status: str | None = None
    info: dict[str, str] = field(default_factory=dict)
    view: list[tuple[str, str, str, str, str]] = field(default_factory=list)
    bad_flags: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "index": self.index,
            "addr": self.addr,
            "host": self.host,
            "port": self.port,
            "netns": self.netns,
            "pid": self.pid,
            "alive": self.alive,
            "stopped": self.stopped,
            "answering": self.answering,
            "role": self.role,
            "id": self.id,
            "master_id": self.master_id,
            "cluster_state": self.cluster_state,
            "master_link_status": self.master_link_status,
            "error": self.error,
        }


def _parse_nodes(text: str, st: NodeStatus) -> None:
    """Fill `st` from CLUSTER NODES: own id/role and a myself-independent cluster view."""
    for line in text.splitlines():
        f = line.split()
        if len(f) < 8:
            continue
        node_id, addr, flags, master, link = f[0], f[1].split("@")[0], f[2], f[3], f[7]
        flag_set = set(flags.split(","))
        role = "master" if "master" in flag_set else "replica" if "slave" in flag_set else "?"
        if "myself" in flag_set:
            st.id, st.role = node_id, role
            st.master_id = None if master == "-" else master
        bad = flag_set & {"fail", "fail?", "handshake", "noaddr"}
        if bad or link != "connected":
            st.bad_flags.append(f"{addr} {flags} {link}")
        slots = " ".join(s for s in f[8:] if not s.startswith("["))
        st.view.append((node_id, addr, role, master, slots))
    st.view.sort()


def probe(spec: ClusterSpec) -> list[NodeStatus]:
    """Ask every node about itself and the cluster; never raises for a dead node."""
    out = []
    for n in spec.nodes:
        st = NodeStatus(n.index, n.addr, n.host, n.port, n.netns)
        st.pid = node_pid(spec, n)
        st.alive = st.pid is not None
        st.stopped = st.pid is not None and is_stopped(st.pid)
        if st.alive and not st.stopped:
            try:
                with spec.connect(n, timeout=1.0) as c:
                    st.info = parse_info(c.text("CLUSTER", "INFO"))
                    st.cluster_state = st.info.get("cluster_state")
                    _parse_nodes(c.text("CLUSTER", "NODES"), st)
                    if st.role == "replica":
                        repl = parse_info(c.text("INFO", "replication"))
                        st.master_link_status = repl.get("master_link_status")
                st.answering = True
            except (OSError, ReplyError, ClusterError) as exc:
                st.error = str(exc) or type(exc).__name__
        out.append(st)
    return out


def unhealthy_reason(spec: ClusterSpec, nodes: list[NodeStatus]) -> str | None:
    """None if the cluster is fully healthy, else the first problem found.

    Healthy: every node runs and answers; each says cluster_state:ok with all 16384 slots
    assigned and ok and knows every node; all nodes report the same topology; it has the
    expected number of masters, each with at least `replicas` replicas; no node is flagged
    failing; every replica's link to its master is up (so writes made now are replicated).
    """
    for st in nodes:
        if not st.alive:
            return f"node {st.addr} is not running"
        if st.stopped:
            return f"node {st.addr} is stopped (SIGSTOP)"
        if not st.answering:
            return f"node {st.addr} does not answer: {st.error}"
        for key, want in (
            ("cluster_state", "ok"),
            ("cluster_slots_assigned", str(CLUSTER_SLOTS)),
            ("cluster_slots_ok", str(CLUSTER_SLOTS)),
            ("cluster_known_nodes", str(len(spec.nodes))),
        ):
            if st.info.get(key) != want:
                return f"node {st.addr} has {key}:{st.info.get(key)} (want {want})"
        if st.bad_flags:
            return f"node {st.addr} sees {st.bad_flags[0]}"
    first = nodes[0]
    for st in nodes[1:]:
        if st.view != first.view:
            return f"nodes {first.addr} and {st.addr} disagree about the topology"
    masters = [v for v in first.view if v[2] == "master" and v[4]]
    if len(masters) != spec.masters:
        return f"{len(masters)} masters own slots (want {spec.masters})"
    for m in masters:
        count = sum(1 for v in first.view if v[2] == "replica" and v[3] == m[0])
        if count < spec.replicas:
            return f"master {m[1]} has {count} replica(s) (want {spec.replicas})"
    for st in nodes:
        if st.role == "replica" and st.master_link_status != "up":
            return f"replica {st.addr} has master_link_status:{st.master_link_status}"
    return None


def wait_healthy(spec: ClusterSpec, deadline: float) -> float:
    """Poll until `unhealthy_reason` is None; return seconds waited or raise ClusterError."""
    start = time.monotonic()
    while True:
        reason = unhealthy_reason(spec, probe(spec))
        if reason is None:
            return time.monotonic() - start
        if time.monotonic() > deadline:
            raise ClusterError(f"cluster not healthy in time: {reason}")
        time.sleep(0.1)


def summary(nodes: list[NodeStatus]) -> str:
    """Overall cluster_state: "ok" if every answering node says ok, else the worst seen."""
    states = {st.cluster_state for st in nodes if st.answering}
    if not states:
        return "down"
    return "ok" if states == {"ok"} else "fail" if "fail" in states else "unknown"
