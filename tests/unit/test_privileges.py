"""forwarder.privileges: switching to a user in a child process, the control socket's directory.

Needs root (the e2e test tests/e2e/test_user.py covers a whole forwarder); each switch runs in a
fresh interpreter, never in the test process.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from forwarder import privileges

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
ROOT = Path(__file__).resolve().parents[2]
NOBODY = privileges.resolve("nobody")

SWITCH = """
import json, os, sys
from forwarder import privileges
identity = privileges.resolve("nobody")
if sys.argv[1] == "drop-setuid-first":
    privileges.drop_capabilities()
try:
    privileges.check_can_switch(identity)
    kept = privileges.switch_user(identity)
except OSError as exc:
    print(json.dumps({"error": str(exc)}))
    sys.exit(0)
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines())
print(json.dumps({"kept": kept, "uid": os.getresuid(), "status": status}))
"""


def switch(mode: str = "") -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", SWITCH, mode],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        timeout=60,
    )
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_root_becomes_the_user_keeping_net_raw_and_net_admin_only() -> None:
    result = switch()
    both = 1 << privileges.CAP_NET_RAW | 1 << privileges.CAP_NET_ADMIN
    assert result["kept"] == both
    assert result["uid"] == [NOBODY.uid] * 3
    status = result["status"]
    assert isinstance(status, dict)
    assert status["Gid"].split() == [str(NOBODY.gid)] * 4
    assert {k: int(status[k], 16) for k in ("CapEff", "CapPrm", "CapBnd")} == dict.fromkeys(
        ("CapEff", "CapPrm", "CapBnd"), both
    )
    assert int(status["CapInh"], 16) == int(status["CapAmb"], 16) == 0
    assert status["NoNewPrivs"].strip() == "1"


def test_without_cap_setuid_the_switch_is_refused_up_front() -> None:
    result = switch("drop-setuid-first")
    assert "needs CAP_SETUID and CAP_SETGID" in str(result.get("error")), result


def test_a_missing_socket_directory_is_created_for_the_user(tmp_path: Path) -> None:
    socket = tmp_path / "run" / "flowstate" / "forwarder.sock"
    privileges.give_socket_directory(socket, NOBODY)
    st = os.stat(socket.parent)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (NOBODY.uid, NOBODY.gid, 0o700)


def test_a_root_directory_of_forwarder_files_is_taken_over_with_them(tmp_path: Path) -> None:
    directory = tmp_path / "flowstate"
    directory.mkdir(mode=0o755)
    lock = directory / "forwarder.sock.lock"
    lock.touch(mode=0o600)  # a previous run as root
    privileges.give_socket_directory(directory / "forwarder.sock", NOBODY)
    assert os.stat(directory).st_uid == NOBODY.uid and os.stat(lock).st_uid == NOBODY.uid
    assert os.stat(directory).st_mode & 0o7777 == 0o700


def test_a_shared_directory_is_not_given_away(tmp_path: Path) -> None:
    (tmp_path / "something-else").touch()
    with pytest.raises(OSError, match=r"holds other files .*something-else"):
        privileges.give_socket_directory(tmp_path / "forwarder.sock", NOBODY)
    assert os.stat(tmp_path).st_uid == 0  # untouched


def test_a_directory_of_another_user_is_not_taken(tmp_path: Path) -> None:
    other = next(p for p in pwd.getpwall() if p.pw_uid not in (0, NOBODY.uid))
    directory = tmp_path / "d"
    directory.mkdir()
    os.chown(directory, other.pw_uid, other.pw_gid)
    with pytest.raises(OSError, match="owner uid"):
        privileges.give_socket_directory(directory / "forwarder.sock", NOBODY)


def test_files_a_worker_reads_later_are_checked_as_the_user() -> None:
    # Not under tmp_path: its parents are root's only (0700), the user would see nothing.
    with tempfile.TemporaryDirectory(prefix="fs-priv-") as name:
        check_files_as_the_user(Path(name))


def check_files_as_the_user(tmp_path: Path) -> None:
    readable, secret = tmp_path / "ok", tmp_path / "secret"
    readable.write_text("x")
    secret.write_text("x")
    secret.chmod(0o600)
    files = [("--config", readable), ("store.password_file", secret)]
    assert privileges.unreadable(files) == []  # as root
    code = (
        "import sys, json, os; from pathlib import Path; from forwarder import privileges as p;"
        "p.switch_user(p.resolve('nobody'));"
        "print(json.dumps(p.unreadable([(f, Path(x)) for f, x in json.loads(sys.argv[1])])))"
    )
    tmp_path.chmod(0o711)
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps([(f, str(x)) for f, x in files])],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        timeout=60,
    )
    assert json.loads(done.stdout) == [f"store.password_file {secret}: Permission denied"]


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_already_the_user_with_ambient_capabilities_only_drops_the_rest() -> None:
    """systemd's User= with AmbientCapabilities=: no switch, the two kept, ambient cleared."""
    code = (
        "import json; from forwarder import privileges as p;"
        "kept = p.switch_user(p.resolve('nobody'));"
        "print(json.dumps([kept, list(p.capabilities()), open('/proc/self/status').read()]))"
    )
    caps = "+net_raw,+net_admin"
    ids = [f"--reuid={NOBODY.uid}", f"--regid={NOBODY.gid}", "--clear-groups"]
    done = subprocess.run(
        ["setpriv", *ids, f"--inh-caps={caps}", f"--ambient-caps={caps}", sys.executable],
        input=code,
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        timeout=60,
    )
    kept, (effective, permitted, inheritable), status = json.loads(done.stdout)
    both = 1 << privileges.CAP_NET_RAW | 1 << privileges.CAP_NET_ADMIN
    assert kept == effective == permitted == both and inheritable == 0
    assert "CapAmb:\t0000000000000000" in status and "NoNewPrivs:\t1" in status
