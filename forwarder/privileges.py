"""Least privilege for the worker processes: keep CAP_NET_RAW and CAP_NET_ADMIN only, and
optionally run as a configured user instead of root (issue 7).

Everything here is a thin, checked wrapper of Linux calls (capget/capset and prctl through
ctypes, set*id through `os`); any refusal raises OSError, and the process must then not go on.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import grp
import importlib
import os
import pwd
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from forwarder.config import ForwarderConfig

#: Capabilities a worker keeps (linux/capability.h): its packet sockets (CAP_NET_RAW), their
#: forced buffer sizes and the neighbour probes (CAP_NET_ADMIN).
CAP_NET_ADMIN, CAP_NET_RAW = 12, 13
CAP_SETGID, CAP_SETUID, CAP_SETPCAP = 6, 7, 8
WORKER_CAPABILITIES = (CAP_NET_ADMIN, CAP_NET_RAW)
_PR_SET_KEEPCAPS, _PR_CAPBSET_READ, _PR_CAPBSET_DROP = 8, 23, 24
_PR_SET_NO_NEW_PRIVS, _PR_GET_NO_NEW_PRIVS = 38, 39
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_CAPABILITY_VERSION_3 = 0x20080522

#: Modules a worker imports after start-up (lazily, in functions). They are imported before the
#: switch: the user may not be able to read the Python installation (a virtualenv under
#: /root, say), and a module loaded late would fail then, mid-run, instead of now.
WORKER_MODULES = (
    "uvloop",
    "forwarder.service",
    "forwarder.control",
    "forwarder.reload",
    "forwarder.health",
    "forwarder.bgp",
    "forwarder.neigh",
    "forwarder.bpf",
    "forwarder.fastpath",
    "forwarder.metrics",
    "forwarder.pyengine",
    "forwarder.pyio",
    "forwarder._fastpath",
    "flowstate.store",
    "flowstate.store.redis_cluster",
)


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in ("effective", "permitted", "inheritable")]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _prctl(option: int, arg: int, what: str) -> None:
    _check(_libc().prctl(option, arg, 0, 0, 0), what)


def capabilities() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) of this process, as bit masks."""
    header, data = _Header(_CAPABILITY_VERSION_3, 0), (_Data * 2)()
    _check(_libc().capget(ctypes.byref(header), data), "capget")
    return tuple(  # type: ignore[return-value]
        int(getattr(data[0], n)) | int(getattr(data[1], n)) << 32
        for n in ("effective", "permitted", "inheritable")
    )


def _capset(effective: int, permitted: int, inheritable: int = 0) -> None:
    header, data = _Header(_CAPABILITY_VERSION_3, 0), (_Data * 2)()
    for i in (0, 1):
        data[i].effective = effective >> (32 * i) & 0xFFFFFFFF
        data[i].permitted = permitted >> (32 * i) & 0xFFFFFFFF
        data[i].inheritable = inheritable >> (32 * i) & 0xFFFFFFFF
    _check(_libc().capset(ctypes.byref(header), data), "capset")


def mask(caps: Sequence[int]) -> int:
    return sum(1 << cap for cap in set(caps))


def drop_capabilities(keep: Sequence[int] = WORKER_CAPABILITIES) -> int:
    """Keep only `keep` (of what this process has) in its effective, permitted and bounding
    sets, and nothing inheritable or ambient: neither this process nor a program it runs can
    get the others back. Returns the mask kept; raises OSError if the kernel refuses."""
    libc = _libc()
    _effective, permitted, _inheritable = capabilities()
    kept = mask(keep) & permitted
    # Everything permitted effective first: after a change of uid with PR_SET_KEEPCAPS the
    # kernel cleared the effective set, and the bounding set needs CAP_SETPCAP effective.
    _capset(permitted, permitted)
    # The bounding set while CAP_SETPCAP is still effective (without it, as a non-root user,
    # there is nothing in it to fear: exec cannot raise what we lack).
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for cap in range(last + 1):
        if kept >> cap & 1 or libc.prctl(_PR_CAPBSET_READ, cap, 0, 0, 0) != 1:
            continue
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and permitted >> CAP_SETPCAP & 1:
            _check(-1, f"PR_CAPBSET_DROP {cap}")  # we had CAP_SETPCAP: it must not fail
    # Fails only on kernels without ambient capabilities (< 4.3), which have none to clear.
    libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    _capset(kept, kept)
    return kept


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a worker becomes: user name, uid, gid and every supplementary group."""

    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.user} (uid {self.uid}, gid {self.gid}, groups {list(self.groups)})"


def resolve(user: str, group: str | None = None) -> Identity:
    """Look `user` (and `group`, default its primary group) up; the supplementary groups are
    those /etc/group gives the user. LookupError if either does not exist."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise LookupError(f"no user {user!r}") from None
    gid = entry.pw_gid
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise LookupError(f"no group {group!r}") from None
    groups = tuple(sorted(set(os.getgrouplist(user, gid))))
    return Identity(user, entry.pw_uid, gid, groups)


def runs_as(identity: Identity) -> bool:
    """Whether this process already runs as `identity` (real, effective and saved uid and
    gid). Its supplementary groups are then the launcher's choice (systemd's
    SupplementaryGroups= may add some /etc/group does not list)."""
    return set(os.getresuid()) == {identity.uid} and set(os.getresgid()) == {identity.gid}


def check_can_switch(identity: Identity) -> None:
    """OSError unless this process runs as `identity` or may become it (CAP_SETUID and
    CAP_SETGID effective): said at start, not by every worker failing in turn."""
    if runs_as(identity):
        return
    effective = capabilities()[0]
    if not (effective >> CAP_SETUID & 1 and effective >> CAP_SETGID & 1):
        raise OSError(
            errno.EPERM,
            f"becoming {identity.user} needs CAP_SETUID and CAP_SETGID, this process runs as "
            f"uid {os.geteuid()} without them (under systemd: User= in the unit instead)",
        )


def switch_user(identity: Identity, keep: Sequence[int] = WORKER_CAPABILITIES) -> int:
    """Become `identity` for good (real, effective and saved ids; supplementary groups), keep
    `keep` effective and permitted and nothing else (bounding set included), and set
    PR_SET_NO_NEW_PRIVS. Already that user (systemd's ``User=``): only the capabilities change.
    Returns the mask kept; OSError if any step is refused or `keep` is not all there after."""
    switched = not runs_as(identity)
    if switched:
        # Keep the permitted set across the change of uid (the kernel would clear it), so
        # that the capabilities we keep can be made effective again below.
        _prctl(_PR_SET_KEEPCAPS, 1, "PR_SET_KEEPCAPS")
        os.setgroups(list(identity.groups))
        os.setresgid(identity.gid, identity.gid, identity.gid)
        os.setresuid(identity.uid, identity.uid, identity.uid)
        _prctl(_PR_SET_KEEPCAPS, 0, "PR_SET_KEEPCAPS")
    kept = drop_capabilities(keep)
    _prctl(_PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")
    # Trust, but verify: the ids, the capabilities, and that root is out of reach.
    effective, permitted, inheritable = capabilities()
    if not runs_as(identity) or (switched and set(os.getgroups()) != set(identity.groups)):
        raise OSError(errno.EPERM, f"still uid {os.getresuid()} gid {os.getresgid()}")
    if (effective, permitted, inheritable) != (mask(keep), mask(keep), 0):
        raise OSError(
            errno.EPERM,
            f"capabilities effective {effective:#x} permitted {permitted:#x} inheritable "
            f"{inheritable:#x}, wanted {mask(keep):#x} (started without them?)",
        )
    if _libc().prctl(_PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1:
        raise OSError(errno.EPERM, "PR_SET_NO_NEW_PRIVS did not hold")
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise OSError(errno.EPERM, "could become root again after the switch")
    return kept


def give_directory(path: Path, identity: Identity, what: str, field: str) -> None:
    """Make the directory of `path` (a forwarder file: the control socket, the state file)
    `identity`'s (0700), so that workers running as the user can create, lock, replace and
    remove it there: created if missing; taken over if root owns it and it holds nothing but
    this forwarder's files (``<name>`` and ``<name>.*``: a previous run's sockets, locks,
    temporary or set-aside files). Any other directory is refused (OSError naming `field`):
    it is not the forwarder's to give away."""
    directory = path.parent
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700, parents=True)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(errno.ENOTDIR, f"{what} directory {directory} is not a directory")
    if st.st_uid == identity.uid and st.st_mode & 0o7777 == 0o700:
        entries: list[str] = []
    else:
        entries = os.listdir(directory)
        others = [e for e in entries if e != path.name and not e.startswith(path.name + ".")]
        if st.st_uid not in (0, identity.uid) or others:
            raise OSError(
                errno.EPERM,
                f"{what} directory {directory} holds other files "
                f"({', '.join(sorted(others)[:3]) or 'owner uid ' + str(st.st_uid)}); "
                f"give {field} a directory of its own for user {identity.user}",
            )
        os.chown(directory, identity.uid, identity.gid, follow_symlinks=False)
        os.chmod(directory, 0o700)
    for name in entries:
        # A previous run as root left them: the workers must be able to open them.
        os.chown(directory / name, identity.uid, identity.gid, follow_symlinks=False)


def give_socket_directory(socket: Path, identity: Identity) -> None:
    """The control socket's directory (its workers' sockets ``<socket>[.n]``, their locks, the
    announcer's ``<socket>.bgp``) to `identity`: see `give_directory`."""
    give_directory(socket, identity, "control socket", "control.socket")


def files_to_read(config: ForwarderConfig, config_path: str | None) -> list[tuple[str, Path]]:
    """(field, path) of the files a worker reads after start-up: the config (reload), the
    store's password and TLS files (each reconnect)."""
    s = config.store
    out: list[tuple[str, Path]] = []
    if config_path is not None:
        out.append(("--config", Path(config_path)))
    for name in ("password_file", "tls_ca_file", "tls_cert_file", "tls_key_file"):
        path = getattr(s, name)
        if path is not None:
            out.append((f"store.{name}", path))
    return out


def unreadable(files: Sequence[tuple[str, Path]]) -> list[str]:
    """Why each of `files` cannot be read by this process (field, path and reason)."""
    problems = []
    for field, path in files:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            problems.append(f"{field} {path}: {exc.strerror or exc}")
        else:
            os.close(fd)
    return problems


def unreadable_as(identity: Identity, files: Sequence[tuple[str, Path]]) -> list[str]:
    """`unreadable(files)` as `identity`, asked in a forked child that switches (this process
    keeps its ids): a supervisor's check before it starts workers that would only exit."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into the caller's code
        code = 1
        try:
            os.close(r)
            switch_user(identity)
            os.write(w, "\n".join(unreadable(files)).encode())
            code = 0
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.write(w, f"anything: it could not become the user ({exc})".encode())
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        text = f.read().decode()
    os.waitpid(pid, 0)
    return [line for line in text.splitlines() if line]


def preload(names: Sequence[str] = WORKER_MODULES) -> None:
    """Import `names` now (see WORKER_MODULES); an optional one that is missing is skipped."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            if name != "forwarder._fastpath":  # not built: the config's impl says python
                raise
