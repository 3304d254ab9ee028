"""End to end: BGP control (tests/e2e/test_bgp.py's lab, real BIRD 2) with `user =` set.

The workers run as a throwaway user; the supervisor, which talks to BIRD, writes the drain file
and serves the announcer socket, stays root. Announce once healthy, withdraw on a worker's
SIGKILL and re-announce after its restart (as the user again), drain-pop / undrain-pop through
the user's socket directory, withdraw on SIGTERM.
"""

from __future__ import annotations

import functools
import os
import pwd
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.accounts import throwaway_user
from tests.e2e.test_bgp import WITHDRAW_WITHIN_S, Lab, built_lab
from tests.netns import wait_until

pytestmark = pytest.mark.e2e


@dataclass
class UserLab(Lab):
    user: str = ""

    @property
    def control(self) -> Path:
        return self.workdir / "run" / "ctl.sock"  # a directory the user is given

    def config_text(self) -> str:
        return f'user = "{self.user}"\n' + super().config_text()


def uids(pid: int) -> list[int]:
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    return [int(x) for x in line.split()[1:]]


@pytest.fixture(scope="module")
def lab() -> Iterator[UserLab]:
    with (
        throwaway_user("bgp") as (user, _extra),
        built_lab("bgpuser", functools.partial(UserLab, user=user)) as built,
    ):
        yield built


def test_announced_once_healthy_with_the_worker_running_as_the_user(lab: UserLab) -> None:
    lab.ensure_announced()
    status = lab.status()
    assert status["announced"] is True and status["healthy"] is True
    (worker,) = status["workers"]
    assert uids(worker["pid"]) == [pwd.getpwnam(lab.user).pw_uid] * 4
    assert lab.forwarder is not None and uids(lab.forwarder.pid) == [0] * 4
    assert f"running as user {lab.user} " in lab.log()


def test_worker_sigkill_withdraws_and_the_restarted_worker_is_the_user_again(
    lab: UserLab,
) -> None:
    lab.ensure_announced()
    (worker,) = lab.status()["workers"]
    os.kill(worker["pid"], signal.SIGKILL)
    killed = time.monotonic()
    assert wait_until(lab.withdrawn, WITHDRAW_WITHIN_S, 0.02), (
        f"still announced {time.monotonic() - killed:.2f} s after the SIGKILL\n{lab.log()}"
    )
    assert wait_until(lab.announced, 60, 0.1), f"not re-announced\n{lab.log()}"
    (restarted,) = lab.status()["workers"]
    assert restarted["pid"] != worker["pid"]
    assert uids(restarted["pid"]) == [pwd.getpwnam(lab.user).pw_uid] * 4
    assert lab.log().count(f"running as user {lab.user} ") == 2


def test_drain_pop_and_undrain_pop(lab: UserLab) -> None:
    lab.ensure_announced()
    out = lab.cli("drain-pop")
    assert out.returncode == 0, out.stderr
    assert wait_until(lab.withdrawn, 5, 0.05)
    assert (lab.workdir / "drained").exists()
    out = lab.cli("undrain-pop")
    assert out.returncode == 0, out.stderr
    assert wait_until(lab.announced, 5, 0.05)
    assert not (lab.workdir / "drained").exists()


def test_sigterm_withdraws_before_the_forwarder_exits(lab: UserLab) -> None:
    lab.ensure_announced()
    assert lab.forwarder is not None
    os.kill(lab.forwarder.pid, signal.SIGTERM)
    assert lab.forwarder.wait(30) == 0
    assert lab.withdrawn()
    assert "BGP: withdrew the VIPs (vip4, vip6): forwarder stopping (SIGTERM)" in lab.log()
    lab.forwarder = None
    # The workers removed their sockets from the user's directory on the way out.
    assert not lab.control.exists()
