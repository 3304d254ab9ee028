"""The nft ingress-drop ruleset (pure text)."""

from __future__ import annotations

import ipaddress

from forwarder.ingress import ruleset, table_name


def test_ruleset_drops_exactly_the_vips() -> None:
    vips = [
        ipaddress.ip_address("192.0.2.10").packed,
        ipaddress.ip_address("192.0.2.10").packed,
        ipaddress.ip_address("2001:db8:f::10").packed,
    ]
    text = ruleset("eth1.100", vips)
    assert table_name("eth1.100") == "flowstate_eth1_100"
    assert "table netdev flowstate_eth1_100" in text
    assert 'hook ingress device "eth1.100" priority 0; policy accept;' in text
    assert "ip daddr { 192.0.2.10 } drop" in text
    assert "ip6 daddr { 2001:db8:f::10 } drop" in text
    # Re-running replaces the table instead of failing or duplicating rules.
    assert text.index("delete table netdev") < text.index("chain vips")


def test_ruleset_without_ipv6_vips_has_no_ip6_rule() -> None:
    text = ruleset("eth0", [ipaddress.ip_address("198.51.100.1").packed])
    assert "ip6 daddr" not in text
