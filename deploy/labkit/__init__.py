"""The anycast lab: BGP, POPs, forwarders, backends and a Redis Cluster in namespaces."""
