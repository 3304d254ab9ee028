"""End to end: a forwarder configured with `user` (issue 7) in namespaces (tests/e2e/pop.py).

A throwaway system user (with a supplementary group) is created for the module and removed
after it. Two workers run as that user, with CAP_NET_RAW and CAP_NET_ADMIN only and no new
privileges; the root supervisor keeps root. Everything the forwarder does after the switch is
exercised: real TCP and UDP through it, reload by SIGHUP and by the root CLI (read of a config
file 0640 root:group, fan-out between the workers' sockets), a drain through the control API.
A user who cannot read the config file is refused at start, with the file named.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from forwarder.fastpath import c_engine_available
from forwarder.privileges import CAP_NET_ADMIN, CAP_NET_RAW
from tests.e2e.accounts import throwaway_user
from tests.e2e.conftest import require_netns
from tests.e2e.pop import REPO, VIP4, VIP6, Pop, decap_addr, failures
from tests.netns import wait_until

pytestmark = pytest.mark.e2e

IMPL = "c" if c_engine_available() else "python"
BOTH = 1 << CAP_NET_RAW | 1 << CAP_NET_ADMIN
#: A connection counts as stalled only after this long: the machine is shared and loaded, and
#: what these tests check is that traffic goes through, not how fast.
PATIENT = ("--timeout", "30")


class UserPop(Pop):
    """The standard POP, its forwarder configured to run two workers as `user`."""

    user = ""

    def config_text(self, impl: str, backends: list[int]) -> str:
        text = super().config_text(impl, backends)
        text = text.replace(f'socket = "{self.workdir}/ctl.sock"', f'socket = "{self.socket}"')
        return f'user = "{self.user}"\nworkers = 2\n' + text

    @property
    def socket(self) -> Path:
        # A directory the forwarder does not have yet: it creates it and gives it to the user.
        return self.workdir / "run" / "ctl.sock"


@pytest.fixture(scope="module")
def account() -> Iterator[tuple[str, str]]:
    require_netns()
    with throwaway_user("e2e") as names:
        yield names


@pytest.fixture(scope="module")
def pop(account: tuple[str, str]) -> Iterator[UserPop]:
    def prepare(built: UserPop) -> None:
        built.user = account[0]
        built.workdir.chmod(0o711)  # the user reaches its config file, not the logs' names

    with UserPop.running("user", IMPL, 3, [1, 2, 3], prepare) as built:
        yield built


def status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def workers(pop: Pop) -> dict[int, int]:
    """{worker number: pid} of the supervisor's worker processes."""
    assert pop.forwarder is not None
    sup = pop.forwarder.pid
    out = {}
    for pid in Path(f"/proc/{sup}/task/{sup}/children").read_text().split():
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"--worker" in argv:
            out[int(argv[argv.index(b"--worker") + 1])] = int(pid)
    return out


def cli(pop: UserPop, *args: str) -> Any:
    """`flowstate ARGS --json` as root in the forwarder's namespace; the parsed answer."""
    done = pop.cli(*args, "--json", socket=pop.socket)
    assert done.returncode == 0, (done.stdout, done.stderr, pop.log()[-3000:])
    return json.loads(done.stdout)


def test_workers_run_as_the_user_with_net_raw_and_net_admin_only(
    pop: UserPop, account: tuple[str, str]
) -> None:
    user, extra = account
    uid, gid = pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid
    assert wait_until(lambda: len(workers(pop)) == 2, 20), pop.log()[-3000:]
    for worker, pid in workers(pop).items():
        s = status(pid)
        assert s["Uid"].split() == [str(uid)] * 4, (worker, s["Uid"])
        assert s["Gid"].split() == [str(gid)] * 4, (worker, s["Gid"])
        assert set(s["Groups"].split()) == {str(gid), str(grp.getgrnam(extra).gr_gid)}
        caps = {k: int(v, 16) for k, v in s.items() if k.startswith("Cap")}
        assert caps == {"CapInh": 0, "CapPrm": BOTH, "CapEff": BOTH, "CapBnd": BOTH, "CapAmb": 0}
        assert s["NoNewPrivs"] == "1"
    assert pop.forwarder is not None
    assert status(pop.forwarder.pid)["Uid"].split() == ["0"] * 4  # the supervisor stays root
    assert pop.log().count(f"running as user {user} (uid {uid}, gid {gid}") == 2
    assert pop.log().count("capabilities: kept 0x3000") == 2
    # The control socket's directory was made for the user; its sockets are the user's.
    st = os.stat(pop.socket.parent)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (uid, gid, 0o700)
    sockets = (pop.socket, pop.socket.with_name("ctl.sock.1"))
    assert wait_until(lambda: all(p.exists() for p in sockets), 20), pop.log()[-3000:]
    for path in sockets:
        assert os.stat(path).st_uid == uid, path


def test_tcp_and_udp_go_through(pop: UserPop) -> None:
    for vip in (VIP4, VIP6):
        tcp = pop.tool("http-clients", "--vip", vip, *PATIENT, "--conns", "20", "--requests", "3")
        assert not failures(tcp), (failures(tcp)[:3], pop.log()[-3000:])
        assert {r["backends"][0] for r in tcp} <= {"b1", "b2", "b3"}
    udp = pop.tool("udp-clients", "--vip", VIP4, "--flows", "20", "--datagrams", "2")
    assert not failures(udp), failures(udp)[:3]


def draining(pop: UserPop, n: int) -> str:
    """The config with backend `n` draining on every VIP (a change a reload applies live)."""
    address = f'address = "{decap_addr(n)}"\n'
    return pop.config_text(IMPL, [1, 2, 3]).replace(address, address + 'state = "draining"\n')


def test_reload_by_sighup_reads_a_config_file_of_root_and_the_users_group(
    pop: UserPop, account: tuple[str, str]
) -> None:
    config = pop.workdir / "forwarder.toml"
    os.chown(config, 0, pwd.getpwnam(account[0]).pw_gid)
    config.chmod(0o640)
    before = workers(pop)
    applied = pop.log().count(" applied (")
    lines = pop.reload_forwarder(IMPL, [], text=draining(pop, 3))
    assert f"tcp {VIP4}:80: backend {decap_addr(3)} state active -> draining" in lines, lines
    assert wait_until(lambda: pop.log().count(" applied (") == applied + 2, 20), pop.log()[-3000:]
    fresh = pop.tool("http-clients", "--vip", VIP4, *PATIENT, "--conns", "40")
    assert not failures(fresh), failures(fresh)[:3]
    assert "b3" not in {r["backends"][0] for r in fresh}
    assert workers(pop) == before  # applied live by the same processes


def test_the_root_cli_reloads_and_drains_through_the_users_sockets(pop: UserPop) -> None:
    (pop.workdir / "forwarder.toml").write_text(pop.config_text(IMPL, [1, 2, 3]))
    answer = cli(pop, "reload")
    assert answer["error"] is None and sorted(answer["workers"]) == [0, 1], answer
    assert answer["errors"] == [], answer
    assert f"tcp {VIP4}:80: backend {decap_addr(3)} state draining -> active" in answer["changes"]
    again = pop.tool("http-clients", "--vip", VIP4, *PATIENT, "--conns", "40")
    assert not failures(again) and "b3" in {r["backends"][0] for r in again}
    drained = cli(pop, "backends", "drain", decap_addr(2), "--vip", f"{VIP4}:80/tcp")
    assert sorted(drained["workers"]) == [0, 1] and drained["errors"] == [], drained
    try:
        fresh = pop.tool("http-clients", "--vip", VIP4, *PATIENT, "--conns", "40")
        assert not failures(fresh), failures(fresh)[:3]
        assert "b2" not in {r["backends"][0] for r in fresh}
    finally:
        cli(pop, "backends", "undrain", decap_addr(2))


def test_no_worker_died_and_no_import_failed_after_the_switch(pop: UserPop) -> None:
    assert not pop.forwarder_died()
    log = pop.log()
    assert "exited with" not in log and "Traceback" not in log, log[-3000:]
    assert "ImportError" not in log and "PermissionError" not in log, log[-3000:]


@pytest.mark.parametrize("worker", [["--worker", "0"], []], ids=["worker", "supervisor"])
def test_a_user_who_cannot_read_the_config_is_refused_at_start(
    pop: UserPop, account: tuple[str, str], worker: list[str]
) -> None:
    """A worker refuses before it opens anything; the supervisor before it starts workers
    (which would exit one after the other)."""
    private = pop.workdir / f"private{len(worker)}"
    private.mkdir(mode=0o700)
    config = private / "forwarder.toml"
    other = pop.workdir / f"run{len(worker)}" / "ctl.sock"
    text = pop.config_text(IMPL, [1, 2, 3]).replace(str(pop.socket), str(other))
    config.write_text("ingress_drop = false\n" + text)  # the running forwarder's nft table
    argv = ["-m", "forwarder.daemon", "--config", str(config), "--keep-offloads", *worker]
    done = pop.fwd.run(
        [sys.executable, *argv],
        env={"PYTHONPATH": str(REPO)},
        check=False,
        timeout=60,
    )
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert f"user {account[0]} cannot read --config {config}: Permission denied" in done.stderr
    assert "worker 0 exited" not in done.stderr, done.stderr
    assert not pop.forwarder_died()
