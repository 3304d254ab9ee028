"""The lab's fixed addresses and ports, in one place.

Documentation prefixes for the VIPs (RFC 5737, RFC 3849); ULA and RFC 1918 ranges inside the lab.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VIP4, VIP6 = "192.0.2.10", "2001:db8:f::10"
HTTP_PORT, UDP_PORT = 80, 53
CLIENT4_FIRST, CLIENT6_FIRST = "10.1.0.10", "fd00:1::1:0"
"""First client address of each family; the client namespace holds a run of them."""
ROUTER_FABRIC4, ROUTER_FABRIC6 = "10.3.0.1", "fd00:3::1"
"""The router's leg on the fabric: the backends' default gateway for their direct replies."""
REDIS_BASE_PORT = 7000
PASSWORD_ENV = "FLOWSTATE_LAB_REDIS_PASSWORD"
"""Environment variable that hands the Redis password to the forwarders."""
