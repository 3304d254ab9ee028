"""The namespace toolkit of end-to-end tests: one implementation, shared with the lab.

It lives in `deploy.labkit.netns`; this module re-exports it for the tests.
"""

from deploy.labkit.netns import (
    NETNS_PREFIX,
    Netns,
    NetnsError,
    Topology,
    Veth,
    netns_unavailable,
    remove_stale_namespaces,
    wait_until,
)

__all__ = [
    "NETNS_PREFIX",
    "Netns",
    "NetnsError",
    "Topology",
    "Veth",
    "netns_unavailable",
    "remove_stale_namespaces",
    "wait_until",
]
