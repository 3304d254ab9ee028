"""Fixtures for end-to-end tests in real network namespaces (need root and iproute2).

Without them the tests skip, except under CI=true, where a missing capability is a failure.
"""

from __future__ import annotations

import functools
import os

import pytest

from tests.netns import Topology, netns_unavailable, remove_stale_namespaces


@functools.cache
def _netns_problem() -> str | None:
    problem = netns_unavailable()
    if problem is None:
        remove_stale_namespaces()
    return problem


def require_netns() -> None:
    """Skip the calling test when namespaces are unusable; fail instead under CI=true."""
    problem = _netns_problem()
    if problem is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"end-to-end tests cannot run in CI: {problem}")
    pytest.skip(problem)


@pytest.fixture
def netns_factory(request: pytest.FixtureRequest) -> Topology:
    """A `Topology` for this test: `netns_factory.add_netns("client")`, `.veth(...)`.

    Its finalizer ends every process and deletes every namespace, pass or fail.
    """
    require_netns()
    topology = Topology(tag=request.node.name)
    request.addfinalizer(topology.close)
    return topology
