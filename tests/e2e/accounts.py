"""A throwaway system user for end-to-end tests of `user =` (removed afterwards, pass or fail)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator


@contextlib.contextmanager
def throwaway_user(tag: str) -> Iterator[tuple[str, str]]:
    """A system user (own group, no home, no shell) that is also in a second, supplementary
    group; yields (user, supplementary group). Names carry `tag` and this process's id."""
    user, extra = f"fs-{tag}-{os.getpid()}", f"fs-{tag}-x{os.getpid()}"
    subprocess.run(["groupadd", "--system", extra], check=True, capture_output=True)
    try:
        subprocess.run(
            ["useradd", "--system", "-U", "-M", "-s", "/usr/sbin/nologin", "-G", extra, user],
            check=True,
            capture_output=True,
        )
        try:
            yield user, extra
        finally:
            subprocess.run(["userdel", user], check=False, capture_output=True)
    finally:
        subprocess.run(["groupdel", extra], check=False, capture_output=True)
