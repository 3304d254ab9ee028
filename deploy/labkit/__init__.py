"""The anycast lab: BGP, POPs, forwarders, backends and a Redis Cluster in namespaces.

`deploy/lab` is its command line (`cli`); README.md here explains what it shows.
"""
